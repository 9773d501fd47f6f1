"""The decoding engine (nano-vllm shape): sequence, sampling, KV cache, scheduler, model runner, LLMEngine, AsyncLLMEngine."""
