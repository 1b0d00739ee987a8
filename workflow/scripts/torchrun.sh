#!/usr/bin/env bash
# Start a torch.distributed program on whatever it was given.
#   torchrun.sh MPI NPROC PYTHON PROGRAM_ARGS...
# MPI is the rule's `mpi` resource: "srun" in a Slurm job of several nodes (profiles/slurm
# sets it for rule pretrain), "" elsewhere.
# - Several nodes: one torchrun per node (srun), all meeting at a c10d rendezvous on the
#   first node.
# - Otherwise: one torchrun here (--standalone).
# Processes per node: the node's GPUs (Slurm's count, else CUDA_VISIBLE_DEVICES), else NPROC.
set -euo pipefail
mpi=$1 nproc=$2 python=$3
shift 3
export MRPLIP_NPROC=$nproc
if [[ -n $mpi && -n ${SLURM_JOB_ID:-} ]] && nodes=$(squeue -h -j "$SLURM_JOB_ID" -o %D 2>/dev/null) && ((nodes > 1)); then
  # Snakemake's job step removes SLURM_* except SLURM_JOB_ID: ask Slurm about the job.
  head=$(scontrol show hostnames "$(squeue -h -j "$SLURM_JOB_ID" -o %N)" | head -n1)
  addr=$(scontrol show node "$head" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
  # one port per job, so two trainings sharing a head node do not collide
  export MRPLIP_RDZV_ENDPOINT="${addr:-$head}:${MRPLIP_RDZV_PORT:-$((29500 + SLURM_JOB_ID % 1000))}"
  # inside the step Slurm sets SLURM_NNODES and SLURM_GPUS_ON_NODE for each node
  exec srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash -c 'exec "$0" -m torch.distributed.run --nnodes="$SLURM_NNODES" \
      --nproc-per-node="${SLURM_GPUS_ON_NODE:-$MRPLIP_NPROC}" --rdzv-id="$SLURM_JOB_ID" \
      --rdzv-backend=c10d --rdzv-endpoint="$MRPLIP_RDZV_ENDPOINT" "$@"' "$python" "$@"
fi
gpus=${SLURM_GPUS_ON_NODE:-}
if [[ -z $gpus && -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
  gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
fi
exec "$python" -m torch.distributed.run --standalone --nproc-per-node="${gpus:-$nproc}" "$@"
