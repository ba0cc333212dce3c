"""Stage 1, extraction: corpus windows -> one forward pass -> per-neuron top/bottom/random/quantile records and
statistics, checkpointed. The driver half is orchestrator/extraction/.

    corpus.py       corpus sources, windowing, the `sequences` table
    keys.py         seeded hashes and int64 sort keys (random samples, top-record order, quantile picks)
    capture.py      per-window reductions and the fused, compiled capture
    collectors.py   reservoirs, running statistics and the per-layer collectors
    sketch.py       the mergeable sketch of window maxima that quantile records are picked from
    forward.py      hooking the model and running the batch forward
    checkpoint.py   a worker's state in the run store
    worker.py       ExtractWorker: chunks -> collector updates -> checkpoints
    actor.py        the thin Ray actor around ExtractWorker
    errors.py       ExtractError
"""
