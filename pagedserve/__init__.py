"""pagedserve: PagedAttention inference engine, OpenAI-compatible server, router and tools."""
from pagedserve.sampling_params import SamplingParams
from pagedserve.outputs import CompletionOutput, RequestOutput

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name):  # lazy: importing the package must not import torch
    if name == "LLM":
        from pagedserve.llm import LLM

        return LLM
    raise AttributeError(name)
