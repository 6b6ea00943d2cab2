-- wrk script: a small chat completion against the bench-zero-latency scenario.
wrk.method = "POST"
wrk.path = "/r/bench/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
wrk.headers["api-key"] = "bench-key"
wrk.headers["content-type"] = "application/json"
wrk.body = '{"messages":[{"role":"user","content":"Say hello in five words."}],"max_tokens":5}'
