"""Every setting the pipeline takes, declared once: name, type, default, help, its
environment variable, whether it defines an output, and whether it travels to pods.

Everything else comes from here: ``config.DEFAULTS`` and ``config.setting``, the Luigi
parameters' types and descriptions (``config.parameter``), the launcher's pod
environment, the command line's defaults, ``.env.example`` and the README's tables
(``python -m pipeline settings --write-docs`` writes them; tests/test_settings.py fails
when they differ). Adding a setting is one ``Setting`` here plus its use.

The environment a pipeline reads but does not own (bucket and Runpod credentials) is
declared as ``Variable``: no default, never logged.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

ENV_PREFIX = "PIPELINE_"
GROUPS = {  # group -> where it is documented: a README table, or only .env.example
    "run": "the run (EmbedAll and every task it starts)",
    "runpod": "Runpod (RunpodEmbedAll, on top of the run's)",
    "image": "the pod's image (make image, python -m pipeline image)",
    "storage": "storage calls (every bucket request)",
    "pod credentials": "bucket credentials for pods, scoped to the run's buckets (docs/security.md)",
}


@dataclass(frozen=True)
class Setting:
    """One setting. ``kind``: str, int, float or bool. ``default``: as text, as it would be
    written in the environment. ``defines_output``: a change makes another output (refused
    on an existing one, exit 30). ``to_pods``: the launcher sends it to its pods' workers.
    ``flag_only``: a command-line switch, never read from the environment; ``env_only``: no
    command-line option (as every setting outside the run and runpod groups). ``secret``:
    never logged or shown."""

    name: str
    kind: type
    default: str
    help: str
    group: str = "run"
    defines_output: bool = False
    to_pods: bool = False
    flag_only: bool = False
    env_only: bool = False
    secret: bool = False
    parameter: str = ""  # the Luigi parameter's name, where it is not ``name``

    @property
    def env(self) -> str:
        return "" if self.flag_only else ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        """Its Luigi command-line option; empty where it has none."""
        if self.env_only or self.group not in ("run", "runpod"):
            return ""
        return "--" + (self.parameter or self.name).replace("_", "-")

    def parse(self, text: str):
        """The value of its text form (environment, luigi.cfg, ``default``)."""
        if self.kind is bool:
            return str(text).strip().lower() in ("1", "true", "yes")
        return self.kind(text)

    def text(self, value) -> str:
        """The text form of a value, as ``parse`` reads it back."""
        return str(value).lower() if isinstance(value, bool) else format(value, "g") if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Variable:
    """An environment variable the pipeline reads but does not own (credentials, endpoints)."""

    env: str
    help: str
    group: str
    secret: bool = False


def _run(name, kind, default, help, **more) -> Setting:
    """A setting of the run: its workers take it, so pods get it too."""
    return Setting(name, kind, default, help, to_pods=True, **more)


SETTINGS: tuple[Setting, ...] = (
    _run("corpus", str, "", "corpus folder, gs://bucket/prefix or s3://bucket/prefix; empty: the generated sample corpus",
         defines_output=True),
    _run("output", str, "output", "output folder, gs://bucket/prefix or s3://bucket/prefix: where the manifest, shards, "
         "rejects and the run's summary go"),
    _run("docs_per_shard", int, "1000", "documents per shard; each shard is one Parquet file and one checkpoint",
         defines_output=True),
    _run("pattern", str, "*.md", "which files are documents: matched against each path relative to the corpus with "
         "PurePosixPath.match, so *.md matches at any depth", defines_output=True),
    _run("model", str, "minilm", "model profile: minilm (all-MiniLM-L6-v2, 384 dimensions, offline) or nomic "
         "(nomic-embed-text-v1.5, 768 dimensions, the production model)", defines_output=True),
    _run("model_path", str, "", "a local folder with the model's weights; empty: the profile finds its own (nothing is "
         "downloaded at run time)", defines_output=True),
    _run("max_tokens", int, "0", "tokens per model input, special tokens and prefix included; 0: the profile's default "
         "(512 for nomic, 256 for minilm)", defines_output=True),
    _run("dimensions", int, "0", "0 keeps every dimension; fewer (64-768) only for nomic, which is trained for it "
         "(Matryoshka)", defines_output=True),
    _run("vector_dtype", str, "float32", "how vectors are stored: float32, or float16 (half the bytes; readers still "
         "give float32)", defines_output=True),
    _run("compact_columns", str, "", "extra columns beside the vectors: binary (sign bits), int8, or binary,int8",
         defines_output=True),
    _run("skip_duplicates", bool, "false", "reject (reason duplicate) a document whose content_hash an earlier one in "
         "the manifest has, instead of embedding it again", defines_output=True),
    _run("batch_tokens", int, "0", "padded tokens per forward pass; 0: 16384 on a GPU, 4096 on a CPU"),
    _run("device", str, "auto", "auto (CUDA if visible, else the CPU), cpu, cuda or cuda:N"),
    _run("precision", str, "auto", "auto (float16 on CUDA; on a CPU with bf16 instructions, float32 or bfloat16, "
         "whichever measures faster with vectors within cosine 0.9999 of float32's; else float32), float32, float16 or "
         "bfloat16; every shard records which and why"),
    _run("readers", int, "-1", "processes that read and chunk documents; -1: cores - 1 on a GPU (up to 8), none on a CPU"),
    Setting("add_new_documents", bool, "false", "append the documents added to the corpus since the manifest was "
            "written, as new shards", flag_only=True),
    Setting("sync", bool, "false", "follow the corpus: embed new and changed documents into new shards, re-key moved "
            "ones, mark deleted ones (a new generation of the manifest)", flag_only=True),
    # Runpod: RunpodEmbedAll's own.
    Setting("pod_model", str, "nomic", "the model profile on a pod", group="runpod",
            parameter="model"),
    Setting("image", str, "", "the pod's image (what make image pushed); empty: build and push one now", group="runpod"),
    Setting("gpu_types", str, "NVIDIA GeForce RTX 4090,NVIDIA RTX A6000,NVIDIA L40S",
            "GPU types, comma-separated, in order of preference", group="runpod"),
    Setting("cloud_type", str, "ALL", "ALL, COMMUNITY or SECURE", group="runpod"),
    Setting("spot", bool, "false", "interruptible pods: cheaper; a pod taken back is replaced and the work resumes",
            group="runpod"),
    Setting("spot_relaunches", int, "3", "how many taken-back spot pods to replace before giving up", group="runpod"),
    Setting("max_dollars", float, "25", "the output's spend limit over all its launches (the ledger counts every pod "
            "ever run for it; a rerun gets what is left, not a new budget), shared evenly by the running pods; each ends "
            "itself past its share", group="runpod"),
    Setting("pods", int, "1", "pods working at once, each a Luigi worker on --pods-scheduler-url", group="runpod"),
    Setting("pods_scheduler_url", str, "", "a luigid every pod can reach (needed for --pods above 1)", group="runpod"),
    Setting("gpus_per_pod", int, "1", "GPUs per pod; the pod runs one worker per GPU, each pinned to its own",
            group="runpod"),
    Setting("poll_seconds", float, "30", "how often the launcher looks at its pods, the shards and the spend",
            group="runpod"),
    Setting("first_shard_seconds", float, "1800", "end the pods when no shard comes this long after a pod runs",
            group="runpod"),
    Setting("idle_seconds", float, "3600", "end the pods when no new shard comes this long (the pod's watchdog too)",
            group="runpod"),
    Setting("provisioning_seconds", float, "1200", "end a pod that is not running this long after its creation",
            group="runpod"),
    Setting("capacity_seconds", float, "1800", "how long to look for a free GPU before giving up", group="runpod"),
    Setting("watchdog_max_seconds", float, "604800", "the most seconds a pod runs, whatever it is doing (its watchdog "
            "ends it)", group="runpod", env_only=True),
    Setting("watchdog_check_seconds", float, "30", "how often a pod's watchdog looks at its shards, runtime and spend",
            group="runpod", env_only=True),
    # The pod's image.
    Setting("registry", str, "", "the registry make image pushes to, for example ghcr.io/you (log in with docker login, "
            "or set the two below)", group="image"),
    Setting("registry_username", str, "", "user name for the registry", group="image", secret=True),
    Setting("registry_password", str, "", "password or token for the registry", group="image", secret=True),
    Setting("base_image", str, "", "a Python 3.11 base image into which torch is installed from PyTorch's CUDA index; "
            "empty: the Dockerfile's (python:3.11-slim-bookworm)", group="image"),
    # Storage calls; the pods make them too.
    Setting("storage_retries", int, "8", "attempts per storage call, the first included", group="storage", to_pods=True),
    Setting("storage_retry_max_wait", float, "30", "the most seconds to wait between two attempts of a storage call",
            group="storage", to_pods=True),
    # Scoped credentials for pods (pipeline.runpod.launcher.pod_credentials).
    Setting("pod_google_application_credentials", str, "", "gs://: a service account's key file that reaches the run's "
            "buckets only", group="pod credentials", secret=True),
    Setting("pod_aws_access_key_id", str, "", "s3://: an access key id that reaches the run's buckets only",
            group="pod credentials", secret=True),
    Setting("pod_aws_secret_access_key", str, "", "s3://: the secret access key that goes with it",
            group="pod credentials", secret=True),
    Setting("pod_aws_session_token", str, "", "s3://: a session token, for temporary keys", group="pod credentials",
            secret=True),
)

VARIABLES: tuple[Variable, ...] = (
    Variable("GOOGLE_APPLICATION_CREDENTIALS", "gs://: path to a service-account key file (else Application Default "
             "Credentials)", "buckets", secret=True),
    Variable("GOOGLE_CLOUD_PROJECT", "gs://: Google Cloud project for the client (optional; unset: the placeholder "
             "local)", "buckets"),
    Variable("STORAGE_EMULATOR_HOST", "gs://: a local GCS emulator such as http://127.0.0.1:4443 (anonymous)", "buckets"),
    Variable("AWS_ACCESS_KEY_ID", "s3://: access key id (or AWS_PROFILE for a profile in ~/.aws)", "buckets", secret=True),
    Variable("AWS_SECRET_ACCESS_KEY", "s3://: secret access key that goes with AWS_ACCESS_KEY_ID", "buckets", secret=True),
    Variable("AWS_DEFAULT_REGION", "s3://: the bucket's region, for example us-east-1", "buckets"),
    Variable("AWS_ENDPOINT_URL", "s3://: an S3-compatible server (MinIO, R2, ...) instead of AWS", "buckets"),
    Variable("RUNPOD_API_KEY", "your Runpod API key (never logged, never in the image)", "runpod", secret=True),
)

BY_NAME = {declared.name: declared for declared in SETTINGS}
DEFINING = tuple(declared.name for declared in SETTINGS if declared.defines_output)
SPEED_ONLY = tuple(declared.name for declared in SETTINGS
                   if declared.group == "run" and not declared.defines_output and not declared.flag_only
                   and declared.name != "output")


def declared(name: str) -> Setting:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name} is not a declared setting (pipeline/settings.py)") from None


def default(name: str):
    """A setting's declared default, as its type: for dataclasses whose fields are settings."""
    setting = declared(name)
    return setting.parse(setting.default)


def markdown_table(group: str) -> str:
    """The README's table of one group's settings."""
    lines = ["| parameter | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for setting in SETTINGS:
        if setting.group == group:
            flag = f"`{setting.flag}`" if setting.flag else ""
            env = f"`{setting.env}`" if setting.env else ""
            default = "off" if setting.kind is bool and setting.default == "false" else (
                f"`{setting.default}`" if setting.default else "empty")
            defines = " Defines the output." if setting.defines_output else ""
            lines.append(f"| {flag} | {env} | {default} | {setting.help}.{defines} |")
    return "\n".join(lines)


def _comment(help: str) -> list[str]:
    return textwrap.wrap(f"{help[0].upper()}{help[1:]}.", width=88, initial_indent="# ", subsequent_indent="# ")


def env_example() -> str:
    """``.env.example``: every variable, with its help; the run's settings at their defaults,
    everything else commented out (set but empty is not the same as unset)."""
    out = ["# Copy to .env (git-ignored) and edit; written by `python -m pipeline settings --write-docs`",
           "# from pipeline/settings.py. A variable already set in the environment wins over .env;",
           "# the luigi command line (--corpus ...) wins over both. Never commit real keys.",
           "# Below the run's settings, uncomment only what you set: a variable set but empty is not",
           "# an unset one (an empty AWS_DEFAULT_REGION breaks boto3; an empty number is no number)."]
    groups = dict(GROUPS, buckets="bucket credentials and endpoints (docs/storage.md)")
    for group, title in groups.items():
        out += ["", f"# --- {title[0].upper()}{title[1:]} ---"]
        for setting in (s for s in SETTINGS if s.group == group and s.env):
            commented = "" if group == "run" else "# "
            out += _comment(setting.help) + [f"{commented}{setting.env}={'' if setting.secret else setting.default}"]
        for variable in (v for v in VARIABLES if v.group == group):
            out += _comment(variable.help) + [f"# {variable.env}="]
    return "\n".join(out) + "\n"


def _marker(group: str) -> tuple[str, str]:
    return f"<!-- settings: {group} (python -m pipeline settings --write-docs) -->", "<!-- end of settings -->"


def readme_with_tables(readme: str) -> str:
    """The README with each ``<!-- settings: GROUP … -->`` table written afresh."""
    for group in GROUPS:
        start, end = _marker(group)
        if start in readme:
            before, rest = readme.split(start, 1)
            readme = f"{before}{start}\n{markdown_table(group)}\n{end}{rest.split(end, 1)[1]}"
    return readme


def write_docs(root) -> list[str]:
    """Rewrite ``.env.example`` and the README's tables under ``root``; the files changed."""
    from pathlib import Path

    changed = []
    for path, text in ((Path(root) / ".env.example", env_example()),
                       (Path(root) / "README.md", readme_with_tables((Path(root) / "README.md").read_text()))):
        if path.read_text() != text:
            path.write_text(text)
            changed.append(str(path))
    return changed
