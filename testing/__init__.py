"""Test doubles shared by tests/ and bench/: the fault-injecting OpenAI-compatible server, rule-following stub
backends, planted neurons, the instant runner and tiny models. Never imported by the product; not installed."""
