"""The end of the flow: reading a run directory (reader.py), the neuron index and queries, the report,
import/export to other tools (interchange.py) and the web viewer (viewer/)."""
