"""Property-based fuzzing of adapter files, run by test_hostile.py in its own process so that an
address-space limit (2 GiB above what the process already maps) bounds every load.

For every method: truncations and byte flips of either file, and mutations of the config (values
of every type put at every key, with and without re-signing its checksum). Each load must end in
a UniLoraError, or in an adapter whose outputs equal the saved one's (a re-signed config may
legitimately change them; it must still load or fail with our error), within 10 s.
"""

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

import unilora  # noqa: E402
from unilora import AdapterConfig, UniLoraError, get_model  # noqa: E402
from unilora.store.io import config_sha256  # noqa: E402

from conftest import build, method_options  # noqa: E402

EXAMPLES = 25
IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**40), st.floats(allow_nan=True),
                   st.text(max_size=4), st.lists(st.integers(0, 3), max_size=3), st.just({}))


def reference(method: str, folder: Path):
    model = get_model(build("bert"), AdapterConfig(**{**method_options(method), "target_modules": "all-linear",
                                                      "modules_to_save": ["classifier"]}))
    with torch.no_grad():
        for p in model.projection.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    model.eval().save_pretrained(folder)
    with torch.no_grad():
        return model(input_ids=IDS).logits, {p.name: p.read_bytes() for p in folder.iterdir()}


def load(folder: Path, files: dict, expected, may_differ: bool) -> None:
    for name, data in files.items():
        (folder / name).write_bytes(data)
    started = time.monotonic()
    try:
        model = unilora.from_pretrained(build("bert"), folder)
        with torch.no_grad():
            got = model(input_ids=IDS).logits
        assert may_differ or torch.equal(got, expected), "a damaged adapter loaded with different outputs"
    except UniLoraError:
        pass
    assert time.monotonic() - started < 10, "a load took over 10 s"


def keys_of(meta: dict, prefix=()):
    for key, value in meta.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from keys_of(value, prefix + (key,))


def fuzz(method: str, work: Path) -> int:
    expected, original = reference(method, work / "ref")
    folder = work / "case"
    folder.mkdir()
    meta = json.loads(original["adapter_config.json"])
    paths = sorted(keys_of(meta))
    names = sorted(original)
    runs = [0]
    common = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))

    @common
    @given(st.sampled_from(names), st.floats(0, 1, exclude_max=True))
    def truncated(name, fraction):
        data = original[name]
        load(folder, {**original, name: data[: int(len(data) * fraction)]}, expected, may_differ=False)
        runs[0] += 1

    @common
    @given(st.sampled_from(names), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                                            min_size=1, max_size=4))
    def flipped(name, flips):
        data = bytearray(original[name])
        for where, xor in flips:
            data[int(len(data) * where)] ^= xor
        load(folder, {**original, name: bytes(data)}, expected, may_differ=False)
        runs[0] += 1

    @common
    @given(st.sampled_from(paths), VALUES, st.booleans())
    def mutated(path, value, resign):
        changed = json.loads(original["adapter_config.json"])
        parent = changed
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value
        if resign:
            changed["config_sha256"] = config_sha256(changed)
        load(folder, {**original, "adapter_config.json": json.dumps(changed).encode()}, expected, may_differ=resign)
        runs[0] += 1

    truncated()
    flipped()
    mutated()
    return runs[0]


def main() -> None:
    with open("/proc/self/statm") as handle:
        mapped = int(handle.read().split()[0]) * resource.getpagesize()
    build("bert")  # warm everything the loads use before the limit is set
    limit = mapped + 2 * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for method in unilora.METHODS:
            work = Path(tmp) / method
            work.mkdir()
            total += fuzz(method, work)
    print(f"fuzzed {total} loads of damaged or mutated adapters under a {limit / 2**30:.1f} GiB address-space limit")


if __name__ == "__main__":
    main()
