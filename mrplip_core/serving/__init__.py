"""OpenAI-compatible language-model serving, shared by the stages that talk to a model server.

- :mod:`~mrplip_core.serving.server`: :class:`ManagedServer` starts a server command (``vllm
  serve ...``) for one job, waits for ``/health`` and always stops its whole process group;
- :mod:`~mrplip_core.serving.settings`: the client and server settings (:class:`OpenAIParams`,
  :class:`ServerParams`), the same keys in every section that uses them (``captions.openai``,
  ``pathflip.subcaptions.llm.openai``);
- :mod:`~mrplip_core.serving.client`: :class:`ChatEndpoint`, a server the job started or one
  the user runs, its model resolved from ``/v1/models``, and chat-completions requests with
  retries of transient failures and a clear stop when the server is gone.

Stage-specific request bodies (images, prompts, response schemas) stay in the stages.
"""
