"""The MR-PLIP objective as the paper writes it (issue #15), against loop references.

* CVTA: the default divides exp(s_ap / tau) by the sum over *all* keywords of the textual
  bag (the paper's L_CVTA); ``denominator: negatives_only`` keeps the earlier form.
* MRTVA: the default ``pairs: lineage`` sums the SimSiam term over every ancestor-descendant
  pair of a bag, both directions; ``pairs: adjacent`` keeps the earlier nearest-ancestor pairs.

Every reference here is plain Python (loops, ``math``) written from the formulas, not the
vectorised code under test. The "previous behaviour" numbers were computed with the code
before this change (``other_positives_in_denominator: false``, ``mrtva_all_ancestors:
false``, and ``true`` for the lineage rows) on the seeded inputs built below.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor

from mrplip_core.config_schema import check_section, section_schema
from mrplip_core.losses import DEFAULT_CONFIG, CVTALoss, MRPLIPLoss, MRTVALoss, parent_child_pairs
from mrplip_core.model import ModelDims, ModelSettings, MRPLIPModel, build_text_encoder
from mrplip_core.train.config import PretrainConfig, load_config, write_config
from mrplip_core.train.objective import MRPLIPObjective
from mrplip_core.train.plan import PretrainPlan
from mrplip_core.train.summary import read_run_config, run_summary, upgrade_saved_config
from mrplip_core.train.trainer import _check_resume, _pair_keys

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True")

# ----------------------------------------------------------------------------- helpers


def rows(t: Tensor) -> list[list[float]]:
    return [[float(x) for x in row] for row in t.detach().double()]


def cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def values(out: dict[str, Tensor]) -> dict[str, float]:
    return {key: float(value) for key, value in out.items()}


# ----------------------------------------------------------------------------- CVTA


def cvta_paper(visual: Tensor, keywords: Tensor, k_o: int, tau: float, denominator: str) -> float:
    """L_CVTA of B bags without padding, from the formula.

    For patch a of a bag with keywords w_1..w_k, s_ab = cos(v_a, w_b); P_a = the k_o
    keywords of highest s_ab, N_a the others;
        all_keywords:   l_a = -1/k_o sum_{p in P_a} log( e^{s_ap/tau} / sum_{b=1..k} e^{s_ab/tau} )
        negatives_only: l_a = -1/k_o sum_{p in P_a} log( e^{s_ap/tau} / (e^{s_ap/tau} + sum_{n in N_a} e^{s_an/tau}) )
    L = mean over the bags of the mean over the bag's patches.
    """
    bag_means = []
    for v_bag, w_bag in zip(visual, keywords, strict=True):
        words = rows(w_bag)
        patch_losses = []
        for v in rows(v_bag):
            s = [cos(v, w) for w in words]
            ranked = sorted(range(len(words)), key=lambda j: s[j], reverse=True)
            positives, negatives = ranked[:k_o], ranked[k_o:]
            total = 0.0
            for p in positives:
                if denominator == "all_keywords":
                    below = sum(math.exp(s[b] / tau) for b in range(len(words)))
                else:
                    below = math.exp(s[p] / tau) + sum(math.exp(s[n] / tau) for n in negatives)
                total += -math.log(math.exp(s[p] / tau) / below)
            patch_losses.append(total / len(positives))
        bag_means.append(sum(patch_losses) / len(patch_losses))
    return sum(bag_means) / len(bag_means)


def issue_tensors(seed: int) -> tuple[Tensor, Tensor]:
    """One bag of the issue's shape: 7 patches, 13 keywords (16-d, seeded normal)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 7, 16, generator=g), torch.randn(1, 13, 16, generator=g)


#: CVTA with other_positives_in_denominator=False (the earlier default), k_o = 3, tau = 0.07.
PREVIOUS_NEGATIVES_ONLY = {0: 0.34866264, 1: 0.3551113}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_cvta_is_the_papers_formula(seed: int) -> None:
    visual, keywords = issue_tensors(seed)
    default = float(CVTALoss(k_o=3)(visual, keywords)["cvta"])
    paper = cvta_paper(visual, keywords, 3, 0.07, "all_keywords")
    assert default == pytest.approx(paper, rel=1e-5)
    # the other form is a different objective (a larger denominator: a larger loss) ...
    negatives_only = float(CVTALoss(k_o=3, denominator="negatives_only")(visual, keywords)["cvta"])
    assert negatives_only == pytest.approx(cvta_paper(visual, keywords, 3, 0.07, "negatives_only"), rel=1e-5)
    assert paper > negatives_only + 0.5
    # ... and the one this project used before, value for value
    if seed in PREVIOUS_NEGATIVES_ONLY:
        assert negatives_only == pytest.approx(PREVIOUS_NEGATIVES_ONLY[seed], rel=1e-5)


def test_cvta_over_several_bags_and_temperatures() -> None:
    g = torch.Generator().manual_seed(7)
    visual, keywords = torch.randn(3, 5, 8, generator=g), torch.randn(3, 9, 8, generator=g)
    for tau in (0.07, 0.5):
        for denominator in ("all_keywords", "negatives_only"):
            got = CVTALoss(k_o=2, init_temperature=tau, denominator=denominator)(visual, keywords)["cvta"]
            assert float(got) == pytest.approx(cvta_paper(visual, keywords, 2, tau, denominator), rel=1e-5)


def test_a_user_who_configures_nothing_gets_the_papers_objective(repo_root: Path) -> None:
    assert DEFAULT_CONFIG["cvta"]["denominator"] == "all_keywords"
    assert DEFAULT_CONFIG["mrtva"]["pairs"] == "lineage"
    for config in (load_config(), load_config(repo_root / "config.yaml")):
        loss = MRPLIPLoss.from_config(config.loss, fusion_dim=8, representation_dim=8)
        assert loss.terms["cvta"].denominator == "all_keywords"
        assert loss.terms["mrtva"].pair_mode == "lineage"
    visual, keywords = issue_tensors(0)
    section = {**load_config().loss, "cvta": {**load_config().loss["cvta"], "k_o": 3}}
    built = MRPLIPLoss.from_config(section, fusion_dim=8, representation_dim=8).terms["cvta"]
    assert float(built(visual, keywords)["cvta"]) == pytest.approx(cvta_paper(visual, keywords, 3, 0.07, "all_keywords"), rel=1e-5)


def test_cvta_rejects_an_unknown_denominator() -> None:
    with pytest.raises(ValueError, match="denominator"):
        CVTALoss(denominator="positives")


# ----------------------------------------------------------------------------- MRTVA


def bags(magnifications: list[int], count: int = 2) -> tuple[Tensor, Tensor]:
    """Flat parent links and magnifications of ``count`` complete visual bags at the given
    magnifications: a 5x root, then (m / m_above)^2 children per patch of the level above
    (so 5x, 20x, 40x: 16 x 20x under the root, 4 x 40x under each 20x)."""
    parent: list[int] = []
    magnification: list[int] = []
    for _ in range(count):
        root = len(parent)
        parent.append(-1)
        magnification.append(magnifications[0])
        level = [root]
        for above, here in zip(magnifications, magnifications[1:]):
            fan = (here // above) ** 2
            new = []
            for node in level:
                for _ in range(fan):
                    parent.append(node)
                    magnification.append(here)
                    new.append(len(parent) - 1)
            level = new
    return torch.tensor(parent), torch.tensor(magnification)


def reference_pairs(parent: Tensor, present: Tensor | None, mode: str) -> list[tuple[int, int]]:
    """(ancestor, descendant): each present patch with every present ancestor (lineage) or
    with the nearest one (adjacent), found by walking the parent links."""
    links = parent.tolist()
    keep = [True] * len(links) if present is None else present.tolist()
    pairs = []
    for node in range(len(links)):
        if not keep[node]:
            continue
        ancestors, up = [], links[node]
        while up >= 0:
            if keep[up]:
                ancestors.append(up)
            up = links[up]
        pairs += [(a, node) for a in (ancestors if mode == "lineage" else ancestors[:1])]
    return pairs


def mrtva_loop(loss: MRTVALoss, z: Tensor, pairs: list[tuple[int, int]], magnification: Tensor) -> dict[str, float]:
    """Mean of D(h(g(z_x)), sg(g(z_y))) = -cos over the ordered pairs (x, y) and (y, x) of
    every given pair (the paper's sum over p != c, normalised), plus the mean per
    magnification pair. g and h are the loss's own networks, run once over the rows in a
    pair (their BatchNorm statistics)."""
    used = sorted({i for pair in pairs for i in pair})
    with torch.no_grad():
        projected = loss.projector(z[used])
        predicted = loss.predictor(projected)
    g = dict(zip(used, rows(projected), strict=True))
    h = dict(zip(used, rows(predicted), strict=True))
    mags = magnification.tolist()
    sums: dict[str, list[float]] = {}
    for ancestor, descendant in pairs:
        key = f"mrtva/{mags[ancestor]:g}x-{mags[descendant]:g}x"
        for x, y in ((ancestor, descendant), (descendant, ancestor)):
            sums.setdefault(key, []).append(-cos(h[x], g[y]))
            sums.setdefault("mrtva", []).append(-cos(h[x], g[y]))
    return {key: sum(terms) / len(terms) for key, terms in sums.items()}


def seeded_mrtva(n: int) -> tuple[MRTVALoss, MRTVALoss, Tensor]:
    """Lineage and adjacent losses with the same weights, and z (the seeded setup of the
    "previous behaviour" numbers)."""
    torch.manual_seed(2025)
    lineage = MRTVALoss(8, proj_dim=6, pred_hidden_dim=3)
    z = torch.randn(n, 8)
    adjacent = MRTVALoss(8, proj_dim=6, pred_hidden_dim=3, pairs="adjacent")
    adjacent.load_state_dict(lineage.state_dict())
    return lineage, adjacent, z


#: MRTVA of the code before this change on two seeded bags: nearest-ancestor pairs
#: (mrtva_all_ancestors: false) and every-ancestor pairs (mrtva_all_ancestors: true).
PREVIOUS_MRTVA = {
    ("5-10-20-40", "adjacent"): {"mrtva": -0.0451525, "mrtva/5x-10x": -0.16160861, "mrtva/10x-20x": -0.05629935,
                                 "mrtva/20x-40x": -0.03508729},
    ("5-10-20-40", "lineage"): {"mrtva": -0.08824451, "mrtva/5x-10x": -0.16160861, "mrtva/5x-20x": -0.18801719,
                                "mrtva/5x-40x": -0.16556492, "mrtva/10x-20x": -0.05629935, "mrtva/10x-40x": -0.04253917,
                                "mrtva/20x-40x": -0.03508729},
    ("5-20-40", "adjacent"): {"mrtva": -0.08236742, "mrtva/5x-20x": -0.17929603, "mrtva/20x-40x": -0.05813526},
    ("5-20-40", "lineage"): {"mrtva": -0.10973578, "mrtva/5x-20x": -0.17929603, "mrtva/5x-40x": -0.14394623,
                             "mrtva/20x-40x": -0.05813526},
}
PAIR_COUNTS = {("5-10-20-40", "adjacent"): 2 * 84, ("5-10-20-40", "lineage"): 2 * (4 + 16 * 2 + 64 * 3),
               ("5-20-40", "adjacent"): 2 * 80, ("5-20-40", "lineage"): 2 * (16 + 64 * 2)}


@pytest.mark.parametrize("mode", ["lineage", "adjacent"])
@pytest.mark.parametrize("levels", [[5, 10, 20, 40], [5, 20, 40]], ids=["5-10-20-40", "5-20-40"])
def test_mrtva_pairs_equal_the_loop_reference_and_the_previous_code(levels: list[int], mode: str) -> None:
    parent, magnification = bags(levels)
    lineage, adjacent, z = seeded_mrtva(len(parent))
    loss = lineage if mode == "lineage" else adjacent
    pairs = loss.pair_indices(parent)
    assert sorted(map(tuple, pairs.tolist())) == sorted(reference_pairs(parent, None, mode))
    name = "-".join(map(str, levels))
    assert len(pairs) == PAIR_COUNTS[(name, mode)]
    got = values(loss(z, pairs, magnification))
    expected = mrtva_loop(loss, z, reference_pairs(parent, None, mode), magnification)
    assert got.keys() == expected.keys() == PREVIOUS_MRTVA[(name, mode)].keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
        assert got[key] == pytest.approx(PREVIOUS_MRTVA[(name, mode)][key], rel=1e-5, abs=1e-7), key


def test_a_left_out_magnification_is_bridged() -> None:
    """5x, 20x, 40x drawn, 10x not: 20x pairs with 5x directly; lineage pairs each 40x patch
    with its 20x parent and with the 5x root, adjacent with its 20x parent only."""
    parent, magnification = bags([5, 20, 40], count=1)
    lineage = set(map(tuple, parent_child_pairs(parent, mode="lineage").tolist()))
    adjacent = set(map(tuple, parent_child_pairs(parent, mode="adjacent").tolist()))
    twenty = [i for i in range(len(parent)) if magnification[i] == 20]
    forty = [i for i in range(len(parent)) if magnification[i] == 40]
    assert {(0, i) for i in twenty} <= lineage and {(0, i) for i in twenty} <= adjacent
    for i in forty:
        up = int(parent[i])
        assert magnification[up] == 20
        assert {(up, i), (0, i)} <= lineage
        assert (up, i) in adjacent and (0, i) not in adjacent
    assert len(lineage) == 16 + 64 * 2 and len(adjacent) == 16 + 64


@pytest.mark.parametrize("mode", ["lineage", "adjacent"])
def test_a_magnification_switched_off_by_the_present_mask(mode: str) -> None:
    """The same 10x gap made by the ``present`` mask over a full bag: absent patches are in
    no pair and the chain of ancestors passes through them."""
    parent, magnification = bags([5, 10, 20, 40])
    lineage, adjacent, z = seeded_mrtva(len(parent))
    loss = lineage if mode == "lineage" else adjacent
    present = magnification != 10
    pairs = loss.pair_indices(parent, present)
    expected_pairs = reference_pairs(parent, present, mode)
    assert sorted(map(tuple, pairs.tolist())) == sorted(expected_pairs)
    assert all(magnification[i] != 10 for pair in expected_pairs for i in pair)
    got = values(loss(z, pairs, magnification))
    expected = mrtva_loop(loss, z, expected_pairs, magnification)
    assert got.keys() == expected.keys()
    assert all(got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7) for key in expected)
    if mode == "adjacent":  # the previous code, present-mask input
        assert got == pytest.approx({"mrtva": -0.06234026, "mrtva/5x-20x": -0.18309787, "mrtva/20x-40x": -0.03215086},
                                    rel=1e-5)


def test_with_every_magnification_drawn_only_lineage_pairs_40x_with_5x() -> None:
    parent, magnification = bags([5, 10, 20, 40], count=1)
    forty = [i for i in range(len(parent)) if magnification[i] == 40]
    lineage = set(map(tuple, parent_child_pairs(parent, mode="lineage").tolist()))
    adjacent = set(map(tuple, parent_child_pairs(parent, mode="adjacent").tolist()))
    assert all((0, i) in lineage and (0, i) not in adjacent for i in forty)
    assert adjacent < lineage


def test_every_logged_pair_type_has_a_metrics_column() -> None:
    for levels in ([5, 10, 20, 40], [5, 20, 40], [10, 40]):
        parent, magnification = bags(levels) if levels[0] == 5 else bags([5, *levels])
        present = torch.isin(magnification, torch.tensor(levels))
        lineage, _, z = seeded_mrtva(len(parent))
        produced = set(lineage(z, lineage.pair_indices(parent, present), magnification)) - {"mrtva"}
        assert produced and produced <= set(_pair_keys(tuple(float(m) for m in levels)))


def test_mrtva_rejects_an_unknown_pair_mode() -> None:
    with pytest.raises(ValueError, match="pairs"):
        MRTVALoss(8, pairs="all")
    with pytest.raises(ValueError, match="lineage"):
        parent_child_pairs(torch.tensor([-1, 0]), mode="nearest")


# ----------------------------------------------------------------------------- the objective

TINY_TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


def objective_output(loss_section: dict) -> dict[str, float]:
    """CVTA and MRTVA of a seeded tiny model on two bags of 7 patches (5x, 2 x 10x, 3 x 20x
    under the 10x patches, 1 x 40x), 6 keywords (one padded in bag 2)."""
    dims = ModelDims(image_dim=12, keyword_dim=10, magnifications=(5.0, 10.0, 20.0, 40.0), vocab_size=100)
    torch.manual_seed(0)
    settings = ModelSettings(text_encoder="random", text_config=TINY_TEXT, embed_dim=8, fusion_layers=1,
                             keyword_fusion_layers=1, decoder_layers=1, dropout=0.0)
    text = build_text_encoder("random", TINY_TEXT, vocab_size=dims.vocab_size)
    model = MRPLIPModel(settings, dims, text, heads=("cvta", "mrtva"), keyword_top_k=2)
    section = {"weights": {"itc": 0, "itm": 0, "mlm": 0, "plm": 0}, **loss_section}
    loss = MRPLIPLoss.from_config(section, fusion_dim=32, representation_dim=32)
    g = torch.Generator().manual_seed(3)
    b, p, k = 2, 7, 6
    batch = {
        "features": torch.randn(b, p, 12, generator=g),
        "level": torch.tensor([[0, 1, 1, 2, 2, 2, 3]] * b),
        "magnification": torch.tensor([[5.0, 10, 10, 20, 20, 20, 40]] * b),
        "parent": torch.tensor([[-1, 0, 0, 1, 2, 2, 3]] * b),
        "input_ids": torch.zeros(b, p, 4, dtype=torch.long),
        "attention_mask": torch.ones(b, p, 4, dtype=torch.long),
        "keyword_features": torch.randn(b, k, 10, generator=g),
        "keyword_mask": torch.tensor([[True] * k, [True] * (k - 1) + [False]]),
    }
    return values(MRPLIPObjective(model, loss)(batch))


#: The objective of the code before this change on that batch: its defaults, and with
#: other_positives_in_denominator: true + mrtva_all_ancestors: true.
PREVIOUS_OBJECTIVE = {
    "previous defaults": {"cvta": 0.12905459, "mrtva": -0.04751641, "mrtva/5x-10x": -0.09685045,
                          "mrtva/10x-20x": -0.03854977, "mrtva/20x-40x": 0.02425178, "loss": 0.08153819},
    "paper": {"cvta": 1.38318777, "mrtva": -0.0415452, "mrtva/5x-10x": -0.09685045, "mrtva/5x-20x": -0.12837045,
              "mrtva/5x-40x": 0.18947846, "mrtva/10x-20x": -0.03854977, "mrtva/10x-40x": 0.02373412,
              "mrtva/20x-40x": 0.02425178, "loss": 1.34164262},
}


def test_the_objective_reproduces_the_previous_code_under_the_old_settings() -> None:
    old = objective_output({"cvta": {"k_o": 2, "denominator": "negatives_only"}, "mrtva": {"pairs": "adjacent"}})
    new = objective_output({"cvta": {"k_o": 2}})  # the defaults: the paper's objective
    for got, expected in ((old, PREVIOUS_OBJECTIVE["previous defaults"]), (new, PREVIOUS_OBJECTIVE["paper"])):
        assert {key for key in got if key.startswith("mrtva")} == {key for key in expected if key.startswith("mrtva")}
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


# ----------------------------------------------------------------------------- configuration


def pretrain_plan(config: dict) -> PretrainPlan:
    schema = section_schema("pretrain")
    config = {**config, "pretrain": check_section(config["pretrain"], schema, "pretrain")}
    return PretrainPlan.from_config(config, results="results",
                                    check=lambda section: check_section(section, schema, "pretrain"))


def test_the_shipped_ablations_resolve_with_the_new_defaults(repo_root: Path) -> None:
    config = yaml.safe_load((repo_root / "config.yaml").read_text())
    plan = pretrain_plan(config)
    assert plan.ablations == list(config["ablations"])
    for name, run in plan.runs.items():
        resolved = PretrainConfig.from_dict(run.section)
        assert resolved.loss["cvta"]["denominator"] == "all_keywords", name
        assert resolved.loss["mrtva"]["pairs"] == "lineage", name
    assert "mrtva" not in PretrainConfig.from_dict(plan.runs["no-mrtva"].section).active_terms
    # the earlier objective is one ablation away; a misspelt value names the entry and key
    config["ablations"] = {"earlier": {"loss": {"cvta": {"denominator": "negatives_only"}, "mrtva": {"pairs": "adjacent"}}}}
    earlier = PretrainConfig.from_dict(pretrain_plan(config).runs["earlier"].section)
    assert (earlier.loss["cvta"]["denominator"], earlier.loss["mrtva"]["pairs"]) == ("negatives_only", "adjacent")
    config["ablations"] = {"typo": {"loss": {"mrtva": {"pairs": "nearest"}}}}
    with pytest.raises(ValueError, match=r"ablations\.typo.*pairs"):
        pretrain_plan(config)


@pytest.mark.parametrize("override", ["train.mrtva_all_ancestors=true", "loss.cvta.other_positives_in_denominator=true",
                                      "loss.cvta.denominator=all", "loss.mrtva.pairs=both"])
def test_old_keys_and_unknown_values_fail_naming_the_key(override: str) -> None:
    key = override.split("=")[0].split(".")[-1]
    with pytest.raises(ValueError, match=key):
        load_config(None, None, [override])


def saved_by_the_previous_version() -> dict:
    """The resolved section the code before this change wrote for its defaults."""
    saved = PretrainConfig.from_dict({}).to_dict()
    saved["loss"]["cvta"].pop("denominator")
    saved["loss"]["cvta"]["other_positives_in_denominator"] = False
    saved["loss"]["mrtva"].pop("pairs")
    saved["train"]["mrtva_all_ancestors"] = False
    return saved


def test_resuming_a_run_saved_with_the_old_keys_reports_what_changed() -> None:
    saved = saved_by_the_previous_version()
    upgraded = upgrade_saved_config(saved)
    assert upgraded["loss"]["cvta"]["denominator"] == "negatives_only"
    assert upgraded["loss"]["mrtva"]["pairs"] == "adjacent" and "mrtva_all_ancestors" not in upgraded["train"]
    assert "other_positives_in_denominator" in saved["loss"]["cvta"]  # the input is not modified
    with pytest.raises(ValueError, match=r"loss\.cvta\.denominator', 'loss\.mrtva\.pairs'"):
        _check_resume(PretrainConfig.from_dict({}), {"config": saved}, Path("step_00000002"))
    same = PretrainConfig.from_dict({"loss": {"cvta": {"denominator": "negatives_only"}, "mrtva": {"pairs": "adjacent"}}})
    _check_resume(same, {"config": saved}, Path("step_00000002"))  # the old settings, spelt anew: resumes


def test_the_run_summary_names_the_form_of_each_term(tmp_path: Path) -> None:
    """What the report's ablation table reads: old run folders included."""
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump({"pretrain": saved_by_the_previous_version()}))
    write_config(PretrainConfig.from_dict({}), tmp_path / "new" / "config.yaml")
    write_config(PretrainConfig.from_dict({"loss": {"weights": {"mrtva": 0.0}}}), tmp_path / "no-mrtva" / "config.yaml")
    forms = {run: run_summary(read_run_config(tmp_path / run)) for run in ("old", "new", "no-mrtva")}
    assert {run: (f["cvta_denominator"], f["mrtva_pairs"]) for run, f in forms.items()} == {
        "old": ("negatives_only", "adjacent"), "new": ("all_keywords", "lineage"), "no-mrtva": ("all_keywords", None)}
