"""What a run leaves, and everything that reads it: the output's layout, the pod
ledger, the run summary, status, verify, the report, reading vectors back, search and
the Weaviate mapping. Nothing here needs Luigi or the Runpod SDK."""
