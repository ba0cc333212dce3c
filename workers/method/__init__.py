"""Stage 2, the method: records -> splits -> explainer -> simulator -> scorers -> score rows for one neuron
(neuron.py ties them together). The scoring math in scoring.py is pure; LLM calls go through workers/llm/."""
