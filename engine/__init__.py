"""longserve's engine: models, scheduler, KV tiers, sampling and the offline API."""

from engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # LLM pulls in torch and transformers; keep `import engine` light for the CLI.
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    raise AttributeError(name)
