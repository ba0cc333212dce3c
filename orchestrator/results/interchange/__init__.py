"""Moving results in and out of a run directory.

    openai_layout.py   the objects of OpenAI's neuron-explainer dataset layout (pure)
    openai_export.py   `export_openai`: a run directory -> that layout
    openai_import.py   `import_openai`: that layout (the published data too) -> a run directory
    bundle.py          `export_bundle`: one row per neuron (Parquet or JSON lines) for Neuronpedia-style uploads

The field mapping between the run tables and the OpenAI layout is in README.md, "Export and import".
"""
