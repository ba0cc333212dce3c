"""The driver: plan the run -> drive extraction (extraction/) -> schedule shards on Ray (pipeline.py) ->
commit each shard (shards.py) -> metrics; cli/ is the command line, results/ reads what a run wrote."""
