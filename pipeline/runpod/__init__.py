"""Running on Runpod GPU pods: the orchestrator over the runpod SDK, the launcher task
(``RunpodEmbedAll``), its limits and orphan handling, the pod's watchdog, the image it
runs, and the cost estimate made before any pod starts."""
