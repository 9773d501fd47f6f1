"""The decoding engine (nano-vllm shape): sequence, sampling, KV pages and cache, scheduler, model runner, LLMEngine,
AsyncLLMEngine."""
