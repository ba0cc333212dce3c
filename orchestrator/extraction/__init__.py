"""The extraction stage against a run directory: corpus -> sequences/, actors -> records/ and neuron_stats/.
The worker half is workers/extract/; every path named here is schemas/layout.py's.

Steps, each resumable:
1. `sequences/part-NNNNN.parquet`: the corpus windows cut into chunks of `chunk_windows`, written once
   (`_extract/sequences.json` says they are all there). plan.py, which also pins the run's settings.
2. Actors (Ray, or one in-process worker) each own a checkpoint slot `_extract/state/slot-NNN/`; after every
   finished chunk the slot's collector is saved and its `head.json` lists the chunks it covers. A rerun reads
   the heads, skips covered chunks, and hands out the rest. pools.py; progress.py reports it.
3. Quantile records (`records.quantiles`) only: in step 2 each collector also kept a sketch of its window
   maxima with pick candidates (workers/extract/sketch.py); from the slots' sketches merged the driver picks
   each neuron's quantile windows (`_extract/quantile/picks.pt`), then the actors re-run just the batches
   holding a picked window, cut as in step 2 so the activations are the same bit for bit, one
   `_extract/quantile/chunk-NNNNN/` per chunk. quantiles.py.
4. The slots are merged layer by layer and written as `records/layer=L/nAAAAAA-BBBBBB.parquet` (one file per
   block of neurons, rows sorted by neuron, so reading one shard's neurons touches one file) and
   `neuron_stats/layer=L/all.parquet`. outputs.py, which also reads records back by neuron range.
5. `_extract/complete.json`, last. With it present a rerun does nothing. stage.py runs the steps in order.
"""
from orchestrator.extraction.stage import run_extraction

__all__ = ["run_extraction"]
