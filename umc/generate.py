"""``umc run``: generate token ids from a build or a spec, greedy or sampled (ids in and out: random weights
have no tokenizer).

Greedy decoding takes the argmax of each step's logits, ties going to the lowest id. With a temperature
above 0, each step samples from the softmax of the logits divided by it, among the ``top_k`` most likely
ids when given, from a seeded ``torch.Generator`` (a fixed seed repeats a run). The prompt and the
options are checked before anything is compiled or loaded: ids are integers inside the vocabulary, a
prompt is not empty, prompts of a batch have one length, and prompt plus new tokens fit max_seq_len.

A spec is compiled into a temporary directory and run with ``--weights`` or the eager reference's seeded
weights, so this module imports ``umc.reference`` as well as the runtime (a bridge, like ``umc.verify``).
torch, the runtime and the reference are imported inside the functions: ``umc.cli`` imports this module
for every command, and ``umc check`` should not wait for torch. ``user_errors`` is imported when the
command runs, for the same reason in reverse: ``umc.cli`` imports this module at its end.
"""

from __future__ import annotations

import re
import secrets
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import click

from umc.launch import nproc_options
from umc.resources import format_bytes
from umc.spec import INT_MAX

if TYPE_CHECKING:
    import torch

    from umc.runtime import Session
    from umc.runtime.session import BuildFiles
    from umc.spec import Spec

SEPARATORS = re.compile(r"[\s,]+")
TOKEN_ID = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: int() would also take "1_000" and other scripts' digits

# backends whose session reads a build's export: a spec compiled for one run gets that export too
EXPORT_FOR_BACKEND = {"onnxruntime": "onnx"}


def parse_prompt(text: str, vocab: int, source: str, one_per_line: bool) -> list[list[int]]:
    """Token ids from prompt text: integers separated by whitespace or commas, each in [0, vocab).

    ``one_per_line``: every non-blank line is one prompt of a batch (a prompt file); otherwise the whole
    text is one prompt. InputError names ``source``, the line and the item: an id that is not an
    integer or lies outside the vocabulary, or no id at all.
    """
    from umc.runtime.checks import InputError

    lines = text.splitlines() if one_per_line else [text]
    rows = []
    for number, line in enumerate(lines, 1):
        where = f"{source} line {number}" if one_per_line else source
        items = [item for item in SEPARATORS.split(line) if item]
        for position, item in enumerate(items, 1):
            if not TOKEN_ID.fullmatch(item):
                raise InputError(f"{where}: item {position} {item!r} is not an integer token id")
            if not 0 <= int(item) < vocab:
                raise InputError(f"{where}: item {position} is {int(item)}, outside the vocabulary "
                                 f"(allowed: 0..{vocab - 1})")
        if items:
            rows.append([int(item) for item in items])
    if not rows:
        raise InputError(f"{source} is empty: give at least one token id (e.g. \"1 5 7 9\")")
    return rows


def prompt_tensor(rows: list[list[int]], source: str) -> torch.Tensor:
    """The (B, T) int64 tensor of equal-length prompts; InputError naming the first prompt whose length differs
    (a batch runs in lockstep: every sequence has the same length)."""
    import torch

    from umc.runtime.checks import InputError

    for index, row in enumerate(rows[1:], 2):
        if len(row) != len(rows[0]):
            raise InputError(f"{source}: prompt {index} has {len(row)} ids, prompt 1 has {len(rows[0])}: "
                             f"the prompts of a batch must have equal length")
    return torch.tensor(rows, dtype=torch.int64)


def check_length(prompt_length: int, max_new_tokens: int, max_seq_len: int) -> None:
    """InputError unless 1 <= max_new_tokens and the prompt plus the new tokens fit ``max_seq_len``: a run that
    cannot finish is refused before it starts, naming both numbers."""
    from umc.runtime.checks import InputError

    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompt_length > max_seq_len:
        raise InputError(f"the prompt has {prompt_length} tokens, more than the spec's max_seq_len {max_seq_len}")
    if prompt_length + max_new_tokens > max_seq_len:
        raise InputError(f"a prompt of {prompt_length} tokens + {max_new_tokens} new tokens = "
                         f"{prompt_length + max_new_tokens} exceeds the spec's max_seq_len {max_seq_len}")


def check_sampling(temperature: float, top_k: int | None) -> None:
    """InputError unless the temperature is finite and >= 0 (0: greedy) and top_k, when given, is >= 1."""
    from umc.runtime.checks import InputError

    if not 0 <= temperature < float("inf"):  # also false for NaN
        raise InputError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k must be at least 1, got {top_k}")


def next_tokens(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per sequence from its last logits (B, vocab) -> (B, 1) int64.

    Temperature 0: the argmax (torch returns the first maximum, so ties go to the lowest id). Otherwise a
    draw from softmax(logits / temperature) over the ``top_k`` highest logits (all when None or more than
    the vocabulary), computed in float32 whatever the logits' dtype.
    """
    import torch

    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    k = logits.shape[-1] if top_k is None else min(top_k, logits.shape[-1])
    values, indices = (logits.float() / temperature).topk(k, dim=-1)
    choice = torch.multinomial(torch.softmax(values, dim=-1), 1, generator=generator)
    return indices.gather(-1, choice)


@dataclass(frozen=True)
class Generation:
    """What ``generate`` produced: the new ids (B, N), the seconds of the prefill (with the first token's choice)
    and of the decode loop (the other N - 1 tokens), and the sampling seed used (None when greedy)."""

    tokens: torch.Tensor
    prefill_s: float
    decode_s: float
    seed: int | None


def generate(session: Session, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, seed: int | None = None) -> Generation:
    """Continue every prompt of the batch (B, T) by ``max_new_tokens`` ids through ``session``.

    The first new id comes from the prefill's last logits, each later one from a decode step fed the
    previous id: N new ids take one prefill and N - 1 decode steps. Sampling (temperature > 0) draws from
    a generator seeded with ``seed``, or with a fresh random seed reported in the result so the run can be
    repeated. The session checks the ids and the state; the length and sampling options are checked here
    first, so nothing runs when the request cannot finish.
    """
    import torch

    check_sampling(temperature, top_k)
    check_length(prompt.shape[-1], max_new_tokens, session.spec.model.max_seq_len)
    if temperature == 0:
        seed, generator = None, None
    else:
        seed = secrets.randbelow(2**31) if seed is None else seed  # short enough to retype
        generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        started = time.perf_counter()
        logits, state = session.prefill(prompt)
        token = next_tokens(logits[:, -1].cpu(), temperature, top_k, generator)  # the generator is a CPU one
        prefill_s = time.perf_counter() - started
        produced = [token]
        started = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            logits, state = session.decode(token, state)
            token = next_tokens(logits[:, -1].cpu(), temperature, top_k, generator)
            produced.append(token)
        decode_s = time.perf_counter() - started
    return Generation(torch.cat(produced, dim=1), prefill_s, decode_s, seed)


def read_target(target: Path) -> tuple[Spec, BuildFiles | None]:
    """The spec and, for a build directory, its verified files (manifest, hashes, graphs; read once, as hashing
    a large build's weights takes a while); a spec file gives (spec, None). The prompt is checked against
    this spec before anything is compiled or loaded."""
    if target.is_dir():
        from umc.runtime import read_build

        build = read_build(target)
        return build.spec, build
    from umc.spec import load_spec

    return load_spec(target), None


@contextmanager
def open_session(target: Path, spec: Spec, build: BuildFiles | None, backend: str, weights: str | None,
                 say: Callable[[str], None], world=None) -> Iterator[Session]:
    """A session on ``build``, or on ``spec`` compiled into a temporary directory removed afterwards (split over
    the ``world``'s ranks when there is one).

    Weights: ``weights`` (a safetensors file) when given; else the build's own weights.safetensors when its
    manifest lists it; else the eager reference's weights for the spec's seed (``say`` tells which). A rank of
    a sharded build reads only its pieces of the value tables from a file.
    """
    from umc.runtime import Session, read_build
    from umc.runtime.session import check_world, lookup_backend

    if build is not None:
        if weights is None and build.weights_file is not None:
            weights = str(build.weights_file)
        slices = check_world(build, world, lookup_backend(backend))
        yield Session(build, _weights(spec, weights, say, f"{target} ships no weights.safetensors", slices), backend,
                      world=world)
        return
    from umc.compiler import compile as compile_spec

    with tempfile.TemporaryDirectory(prefix="umc-run-") as scratch:
        out = Path(scratch) / "build"
        compile_spec(spec, out, shards=1 if world is None else world.size)
        if backend in EXPORT_FOR_BACKEND:
            from umc.export.install import export

            export(out, EXPORT_FOR_BACKEND[backend])
        say(f"{target}: compiled into a temporary build for this run")
        yield Session(read_build(out), _weights(spec, weights, say, f"{target} is a spec"), backend, world=world)


def _weights(spec: Spec, path: str | None, say: Callable[[str], None], why: str, slices=None):
    """The tensors of the safetensors file ``path`` (of ``slices``' tables only those pieces), or (None) the
    eager reference's seeded weights, said so."""
    if path is not None:
        from umc.runtime.session import load_weights_file

        say(f"weights: {path}")
        return load_weights_file(path, slices)
    from umc.reference import build_model

    say(f"weights: {why}; using the eager reference's seeded weights (seed {spec.seed})")
    return build_model(spec, seed=spec.seed).state_dict()


def read_prompt(prompt: str | None, prompt_file: str | None, vocab: int) -> torch.Tensor:
    """The (B, T) prompt from exactly one of --prompt (one prompt) and --prompt-file (one prompt per non-blank
    line, equal lengths); InputError when both, neither, or the file cannot be read as text."""
    from umc.runtime.checks import InputError

    if (prompt is None) == (prompt_file is None):
        got = "both" if prompt is not None else "neither"
        raise InputError(f"give exactly one of --prompt and --prompt-file (got {got})")
    if prompt is not None:
        return prompt_tensor(parse_prompt(prompt, vocab, "--prompt", one_per_line=False), "--prompt")
    source = f"--prompt-file {prompt_file}"
    try:
        text = Path(prompt_file).read_text(encoding="utf-8-sig")  # a byte-order mark is not an id
    except OSError as exc:
        raise InputError(f"{source}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"{source}: not UTF-8 text (expected token ids, one prompt per line)") from None
    return prompt_tensor(parse_prompt(text, vocab, source, one_per_line=True), source)


def _rate(tokens: int, seconds: float) -> str:
    if not tokens:
        return "no decode steps"
    return f"{tokens / seconds:.1f} tokens/s" if seconds > 0 else "too fast to time"


def _run(target: str, prompt: str | None, prompt_file: str | None, max_new_tokens: int, backend: str,
         weights: str | None, temperature: float, top_k: int | None, seed: int | None, nproc: int = 1,
         timeout: float = 120.0) -> None:
    """The body of ``umc run``: every check that needs no weights first, then the session and the generation."""
    from umc.cost import memory_needs
    from umc.resources import require_memory
    from umc.runtime import lookup_backend

    say = (lambda line: click.echo(line, err=True))
    spec, build = read_target(Path(target))
    tokens = read_prompt(prompt, prompt_file, spec.model.vocab_size)
    batch, length = tokens.shape
    check_length(length, max_new_tokens, spec.model.max_seq_len)
    check_sampling(temperature, top_k)
    lookup_backend(backend)  # an unknown or unavailable backend is refused before the compile and the weights
    needs = memory_needs(spec, batch=batch, seq_len=length + max_new_tokens)
    require_memory(needs.weight_bytes + needs.kv_cache_bytes + needs.prefill_bytes, f"umc run {spec.name}",
                   parts={"weights": needs.weight_bytes, "KV cache": needs.kv_cache_bytes,
                          "working set": needs.prefill_bytes})
    from umc.launch import world_for

    world = world_for(nproc, timeout, build)
    with open_session(Path(target), spec, build, backend, weights, say, world) as session:
        result = generate(session, tokens, max_new_tokens, temperature, top_k, seed)
    if world is not None:
        say(f"rank {world.rank} of {world.size}: {format_bytes(sum(session.table_bytes.values()))} of value tables "
            f"held here ({world.log.total()} bytes sent to other ranks)")
    for row in result.tokens.tolist():
        click.echo(" ".join(str(i) for i in row))
    if result.seed is None:
        unused = top_k is not None or seed is not None
        say(f"{spec.name} on {backend}: greedy" + (" (--top-k and --seed apply to sampling only)" if unused else ""))
    else:
        say(f"{spec.name} on {backend}: sampling, temperature {temperature}, top-k {top_k or 'all'}, "
            f"seed {result.seed}")
    say(f"prefill: {batch} x {length} tokens in {result.prefill_s * 1e3:.1f} ms "
        f"({_rate(batch * length, result.prefill_s)})")
    steps = max_new_tokens - 1
    say(f"decode: {batch * steps} new tokens ({batch} x {steps} steps) in {result.decode_s * 1e3:.1f} ms "
        f"({_rate(batch * steps, result.decode_s)}); the first new token came from the prefill")


@click.command(name="run")
@click.argument("target", metavar="BUILD_OR_SPEC", type=click.Path())
@click.option("--prompt", default=None, help='Token ids, e.g. "1 5 7 9" (whitespace or commas).')
@click.option("--prompt-file", type=click.Path(dir_okay=False), default=None,
              help="A file of token ids, one prompt per line (equal lengths: they run as one batch).")
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Ids to generate per prompt.")
@click.option("--backend", default="graph", show_default=True,
              help="Backend to run on (see umc.runtime.list_backends()).")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="A safetensors file (default: the build's weights.safetensors, else the spec's seeded weights).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy; above 0: sample.")
@click.option("--top-k", type=int, default=None, help="Sample among the K most likely ids only.")
@click.option("--seed", type=click.IntRange(0, INT_MAX), default=None,
              help="Sampling seed (default: a fresh one, printed on stderr).")
@nproc_options
def run_command(target, prompt, prompt_file, max_new_tokens, backend, weights, temperature, top_k, seed, nproc,
                timeout):
    """Generate token ids from a build directory or a spec (compiled for this run).

    Prints the new ids, one line per prompt, on stdout; the prefill time and the decode tokens/s on
    stderr. Greedy unless --temperature is above 0. Exit 2 on a bad prompt or option.
    """
    from umc.cli import user_errors

    user_errors(_run)(target, prompt, prompt_file, max_new_tokens, backend, weights, temperature, top_k, seed, nproc,
                      timeout)
