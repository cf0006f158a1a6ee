"""The inference engine: requests, sampling, sequences, offline `generate`, the continuous-batching
engine of a served model, its expert executors (remote workers or in process), deployments."""
