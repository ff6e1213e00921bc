"""Documents to vectors, with neither Luigi nor Runpod: the corpus and its manifest,
chunking, the model and its batches, the shard file and the job that makes one shard
(reading in a pool of processes or a thread ahead of the model)."""
