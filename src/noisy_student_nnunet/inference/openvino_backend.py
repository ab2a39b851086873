"""The OpenVINO backend: each network converted once, cached on disk, compiled once per process.

Converting nnU-Net's U-Net from torch to OpenVINO takes seconds to a minute (the conversion prints its time),
compiling the converted model well under a second. So the converted model (OpenVINO IR, fp32
weights) is cached, keyed by the network's content (its architecture and weights, whichever checkpoint or fold
they came from), the static input shape (1, channels, *patch size: the sliding window only ever feeds full
patches), the precision and the OpenVINO version; each process compiles it once and reuses it for every case.

Cache entries are folders ``<root>/<key>/`` holding ``model.xml``, ``model.bin`` and ``meta.json`` (the key and
the SHA-256 of both model files). An entry is built in a temporary folder and renamed into place whole, so a
reader never sees half of one; an entry whose meta.json is missing, names another key or whose files do not hash
as recorded is damaged or stale: it is rebuilt, never trusted. Roots, in order: ``$NSN_OPENVINO_CACHE`` if set;
else ``openvino_cache/`` beside the model (nnU-Net's results folder of it); else, when that folder cannot be
written (a read-only model), ``$XDG_CACHE_HOME/noisy_student_nnunet/openvino`` (``~/.cache`` by default). A valid
entry is read from any of them; a new one is written to the first that can be written. If none can, the model is
converted for this process only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from noisy_student_nnunet.errors import NsnError, error_message
from noisy_student_nnunet.outputs import publish_dir

ENV_CACHE = "NSN_OPENVINO_CACHE"
CACHE_FOLDER = "openvino_cache"  #: beside the model
FORMAT = 1  #: bump when what an entry holds changes
_HINTS = {"fp32": "f32", "bf16": "bf16"}  #: our precision name -> OpenVINO's INFERENCE_PRECISION_HINT
_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}  #: OpenVINO's element type -> our precision name


def compiled_precision(compiled) -> str:
    """The precision a compiled model runs in. OpenVINO's CPU plugin drops a bf16 hint on a CPU without native bf16
    (AVX2 only: no emulation) and runs f32 instead, without a word; the compiled model's property says which."""
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    element = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)  # an ov.Type: "bf16", "f32"
    return _NAMES.get(element, element)


def openvino_version() -> str:
    import openvino

    return openvino.get_version()


def _tensors(network: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(network.state_dict(keep_vars=True).items())


def network_digest(network: torch.nn.Module) -> str:
    """SHA-256 of what the network computes: its module tree (layer types and settings) and every weight."""
    digest = hashlib.sha256(repr(network).encode())
    for name, tensor in _tensors(network):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _weights_version(network: torch.nn.Module) -> Optional[tuple]:
    """Changes whenever a weight is replaced or written in place (load_state_dict copies into the parameters,
    bumping each tensor's version counter): lets a fold switch be noticed without hashing every weight again."""
    try:
        return tuple((t.data_ptr(), t._version) for _, t in _tensors(network))
    except (AttributeError, RuntimeError):
        return None


def cache_roots(model_folder: Optional[str | os.PathLike]) -> list[Path]:
    """Where entries are looked for, in order (the first writable one receives new entries)."""
    explicit = os.environ.get(ENV_CACHE, "").strip()
    if explicit:
        return [Path(explicit).expanduser()]
    roots = [Path(model_folder) / CACHE_FOLDER] if model_folder else []
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return roots + [user / "noisy_student_nnunet" / "openvino"]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class CacheEntry:
    """One converted network in one cache root: ``check`` says whether it may be used, ``build`` (re)makes it."""

    def __init__(self, root: Path, key: dict):
        self.key = key
        self.name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        self.folder = root / self.name

    @property
    def xml(self) -> Path:
        return self.folder / "model.xml"

    def problem(self) -> Optional[str]:
        """None when the entry is complete and is this key's; else why it cannot be used."""
        if not self.folder.is_dir():
            return "missing"
        try:
            meta = json.loads((self.folder / "meta.json").read_text())
        except (OSError, ValueError) as error:
            return f"meta.json unreadable ({error_message(error)})"
        if meta.get("key") != self.key:
            return "stale (made for another network, patch, precision or OpenVINO version)"
        for name in ("model.xml", "model.bin"):
            try:
                if _sha256_file(self.folder / name) != meta.get("sha256", {}).get(name):
                    return f"{name} does not match its recorded checksum"
            except OSError as error:
                return f"{name} unreadable ({error_message(error)})"
        return None

    def build(self, save: Callable[[Path], None]) -> None:
        """``save(xml_path)`` writes the model into a temporary folder; it becomes this entry in one rename. A
        damaged entry in the way is moved aside and removed; if another process published a valid entry first,
        theirs is kept."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.name}.", suffix=".tmp", dir=self.folder.parent))
        try:
            save(tmp / "model.xml")
            meta = {"key": self.key, "sha256": {n: _sha256_file(tmp / n) for n in ("model.xml", "model.bin")},
                    "made": time.strftime("%Y-%m-%d %H:%M:%S")}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            publish_dir(tmp)
            if self.folder.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".{self.name}.", suffix=".old", dir=self.folder.parent))
                os.replace(self.folder, trash / "entry")
                shutil.rmtree(trash, ignore_errors=True)
            try:
                os.rename(tmp, self.folder)
            except OSError:
                if self.problem() is not None:  # not a valid entry of another process: ours was needed
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _first_writable(roots: Sequence[Path]) -> Optional[Path]:
    for root in roots:
        try:
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=root, prefix=".write_check."):
                return root
        except OSError:
            continue
    return None


def compile_config(precision: str, threads: Optional[int] = None) -> dict:
    """OpenVINO's CPU compile options for one patch at a time: the precision hint, latency mode and, where given,
    the thread count. No pinning: a pinned thread cannot leave a core another process keeps busy, and every layer
    waits for it (measured, half-width patch, 2 threads, both cores shared with another job: 11.6-25.5 s pinned,
    2.0-2.5 s not); nnU-Net's machines are shared (two teacher folds side by side, preprocessing threads)."""
    config = {"INFERENCE_PRECISION_HINT": _HINTS[precision], "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


def _say(message: str) -> None:
    print(f"OpenVINO: {message}", flush=True)


def convert(network: torch.nn.Module, input_shape: Sequence[int], progress: bool = True):
    """The network as an OpenVINO model with a static input (tracing without torch's re-check pass, which costs
    several forward passes, then OpenVINO's TorchScript frontend)."""
    import openvino

    example = torch.zeros(tuple(input_shape))
    start = time.perf_counter()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if progress:
            _say(f"  [1/2] tracing the network on a {'x'.join(map(str, input_shape))} input ...")
        traced = torch.jit.trace(network, example, check_trace=False)
        if progress:
            _say(f"  [2/2] converting to OpenVINO ({time.perf_counter() - start:.1f} s so far) ...")
        model = openvino.convert_model(traced, example_input=example, input=[tuple(input_shape)])
    return model


class OpenVinoRunner:
    """Runs full patches through OpenVINO: ``runner(network, x)`` is ``network(x)`` for the weights the network
    holds now. Compiled models are kept per weights (a fold switch is a dictionary lookup after the first case),
    at most ``max_compiled`` at a time; on a switch the previous model's intermediate buffers are released
    (measured, half-width U-Net and patch: 0.3 GB per compiled model while it runs, 0.1 GB idle)."""

    def __init__(self, input_shape: Sequence[int], precision: str, model_folder: Optional[str] = None,
                 threads: Optional[int] = None, max_compiled: int = 5, progress: bool = True):
        if precision not in _HINTS:
            raise NsnError(f"--precision {precision}: the OpenVINO backend runs fp32 or bf16")
        import openvino

        self.core = openvino.Core()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.precision = precision
        self.model_folder = model_folder
        self.threads = threads
        self.max_compiled = max(1, int(max_compiled))
        self.progress = progress
        self._compiled: "OrderedDict[str, tuple]" = OrderedDict()  # digest -> (compiled model, infer request)
        self._version: Optional[tuple] = None
        self._digest: Optional[str] = None

    # --- which weights are loaded
    def _current_digest(self, network: torch.nn.Module) -> str:
        version = _weights_version(network)
        if version is None or version != self._version or self._digest is None:
            self._digest = network_digest(network)
            self._version = version
        return self._digest

    def key(self, digest: str) -> dict:
        return {"format": FORMAT, "network": digest, "input_shape": list(self.input_shape),
                "precision": self.precision, "openvino": openvino_version()}

    # --- the cache
    def _load_or_convert(self, network: torch.nn.Module, digest: str):
        """The OpenVINO model of ``network``: from a valid cache entry, else converted (and cached if possible)."""
        key = self.key(digest)
        roots = cache_roots(self.model_folder)
        for root in roots:
            entry = CacheEntry(root, key)
            why = entry.problem()
            if why is None:
                try:
                    return self.core.read_model(str(entry.xml))
                except Exception as error:  # noqa: BLE001  damaged beyond the checksums: rebuild below
                    why = f"unreadable by OpenVINO ({error_message(error)})"
            if why != "missing":
                _say(f"cache entry {entry.folder} is not usable: {why}; rebuilding it")
        target = _first_writable(roots)
        where = str(target) if target else f"memory only: no cache folder is writable, set {ENV_CACHE}"
        _say(f"converting the network for input {'x'.join(map(str, self.input_shape))}, precision {self.precision} "
             f"(once per network; cached in {where})")
        start = time.perf_counter()
        model = convert(network, self.input_shape, self.progress)
        if target is not None:
            import openvino

            CacheEntry(target, key).build(lambda xml: openvino.save_model(model, str(xml), compress_to_fp16=False))
        _say(f"conversion took {time.perf_counter() - start:.1f} s")
        return model

    def _request(self, network: torch.nn.Module, digest: Optional[str] = None):
        digest = digest or self._current_digest(network)
        if digest in self._compiled:
            if next(reversed(self._compiled)) != digest:
                self._release_last()
                self._compiled.move_to_end(digest)
            return self._compiled[digest][1]
        self._release_last()
        model = self._load_or_convert(network, digest)
        config = compile_config(self.precision, self.threads)
        start = time.perf_counter()
        try:
            compiled = self.core.compile_model(model, "CPU", config)
        except Exception as error:  # noqa: BLE001  e.g. bf16 asked for where OpenVINO cannot run it
            raise NsnError(f"OpenVINO cannot compile the network (precision {self.precision}): "
                           f"{error_message(error)}") from None
        runs_in = compiled_precision(compiled)
        if runs_in != self.precision:
            _say(f"runs {runs_in}, not {self.precision}: this CPU has no native {self.precision}, which "
                 f"OpenVINO does not emulate (--backend torch emulates it, slowly)")
        if self.progress:
            _say(f"compiled in {time.perf_counter() - start:.2f} s ({runs_in}, "
                 f"{compiled.get_property('INFERENCE_NUM_THREADS')} threads)")
        request = compiled.create_infer_request()
        self._compiled[digest] = (compiled, request)
        while len(self._compiled) > self.max_compiled:
            self._compiled.popitem(last=False)
        return request

    def _release_last(self) -> None:
        """Free the intermediate buffers of the model used last (it is reallocated at its next use)."""
        if self._compiled:
            compiled = self._compiled[next(reversed(self._compiled))][0]
            release = getattr(compiled, "release_memory", None)  # OpenVINO >= 2024.3
            if callable(release):
                release()

    def prepare(self, network: torch.nn.Module, digest: Optional[str] = None) -> None:
        """Convert or load, and compile, for the weights the network holds now (before the first patch).
        ``digest``: :func:`network_digest` of those weights where the caller knows it (saves hashing them)."""
        self._request(network, digest)

    def __call__(self, network: torch.nn.Module, x: torch.Tensor, digest: Optional[str] = None) -> torch.Tensor:
        if tuple(x.shape) != self.input_shape:
            raise NsnError(f"OpenVINO backend: patch of shape {tuple(x.shape)}, the network was converted for "
                           f"{self.input_shape}")
        import openvino

        request = self._request(network, digest)
        # OpenVINO writes into a fresh array of ours (no copy of its own output buffer, which the next patch would
        # overwrite): one C x patch array per call instead of two
        output = request.model_outputs[0]
        result = np.empty(tuple(output.get_shape()), dtype=output.get_element_type().to_dtype())
        request.set_output_tensor(0, openvino.Tensor(result, shared_memory=True))
        request.infer({0: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})
        return torch.from_numpy(result)
