"""The engine layer: token ids in, token ids out, a different adapter per request. `Engine` is
the facade; the rest of this package is its parts (scheduler, runner, requests, grammar masks)."""

from .engine import (AdapterInfo, Engine, EngineConfig, FinishReason, Output, Request, RequestHandle, SamplingParams,
                     TokenLogprob)

__all__ = ["AdapterInfo", "Engine", "EngineConfig", "FinishReason", "Output", "Request", "RequestHandle",
           "SamplingParams", "TokenLogprob"]
