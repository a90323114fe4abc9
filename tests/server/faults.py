"""A fault hook for the engine (`Settings.fault_hook`): a request whose seed is POISON[stage]
makes that stage raise while the request is in its batch, as a model error caused by one request
would. Importable in the engine process too."""

POISON = {"vision": 4241, "prefill": 4242, "decode": 4243, "sample": 4244}


def poison(stage: str, requests) -> None:
    if any(r.params.seed == POISON[stage] for r in requests):
        raise RuntimeError(f"simulated {stage} failure")
