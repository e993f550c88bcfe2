"""The vocabulary of n2g: every name and default that the proto, the server, the client, the
command line and the report share, defined once. Importable without torch or the service.

The proto's enums carry the same names (JOB_STATE_RUNNING <-> "running", ...); `n2g.convert`
maps between the two and nothing else spells them out.
"""

from __future__ import annotations

# Build jobs (proto JobState). A job is final once it is succeeded, failed or cancelled.
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
JOB_FINAL = ("succeeded", "failed", "cancelled")

# Build progress stages, in order (BuildEvent.stage / proto JobEvent.stage); "state" is the first
# event of a watch (the job as stored), "failed"/"cancelled" end a job that did not succeed.
BUILD_STAGES = ("state", "corpus", "scan", "merge", "fit", "done", "failed", "cancelled")

# How a graph predicts (n2g-method.md section 6; proto Semantics).
SEMANTICS = ("all_paths_max", "greedy_deepest")
DEFAULT_SEMANTICS = "all_paths_max"

# Search clause roles (n2g-method.md section 9; proto Role).
ROLES = ("activating", "context", "either")
DEFAULT_ROLE = "either"

# Graph pairs (n2g-method.md section 9; proto PairKind).
PAIR_KINDS = ("similar", "subset")
DEFAULT_PAIR_KIND = "similar"
DEFAULT_SIMILARITY_THRESHOLD = 0.9  # the paper's overlap threshold
MIN_PAIR_THRESHOLD = 0.25  # below, nearly every two graphs sharing a token pair up: quadratic output
DEFAULT_NEIGHBOURS = 10
DEFAULT_PAIR_BATCH = 1000

# Evaluation methods (n2g-method.md section 8): ids as stored in a neuron's metrics, and titles.
METHOD_TITLES = {
    "n2g_all_paths_max": "N2G (all paths, max)",
    "n2g_greedy_deepest": "N2G (greedy, deepest)",
    "token_lookup": "token lookup",
    "ngram_lookup": "5-gram lookup",
}
METHODS = tuple(METHOD_TITLES)
BASELINES = ("token_lookup", "ngram_lookup")

# What a server or a local workspace starts with when nothing else is said.
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_CORPUS = "fortunes"
DEFAULT_PORT = 50051
DEFAULT_TARGET = f"localhost:{DEFAULT_PORT}"

# Job ids: what a client may choose (also what the server generates).
JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
