"""What runs inside Ray, one package per stage of the flow: models/ (load the subject model) -> extract/
(activations to records) -> method/ (explain, simulate, score) with llm/ (the explainer and simulator calls)."""
