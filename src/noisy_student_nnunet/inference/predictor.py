"""``LowFootprintPredictor``: stock nnU-Net inference with the paper's memory and time savings (section 2.3).

What differs from ``nnUNetPredictor`` (everything else, including the sliding window, is inherited):

- No mirroring by default (``use_mirroring=False``); fp16 autocast on CUDA is stock's.
- ``precision='auto'``: fp32 on the CPU, stock's fp16 autocast on CUDA; ``'bf16'`` on request
  (:mod:`noisy_student_nnunet.inference.precision`). Mirrored passes are summed in fp32.
- The network gets as many CPU threads as the process has cores (stock caps it at ``nnUNet_def_n_proc``, 8):
  :mod:`noisy_student_nnunet.cpu_threads`.
- Export: argmax at the network's resolution, then nearest-neighbour resampling of the label map
  (``export_mode='nearest'``), or stock-equal linear resampling of scores slab by slab (``'linear'``); see
  :mod:`noisy_student_nnunet.inference.export`. ``save_probabilities`` uses stock's export unchanged.
- Folds are combined on the fly into one fp16 array that stays on the GPU when it fits
  (``fold_combination='logits'``, stock's mean of logits) or as a mean of softmax probabilities
  (``'softmax'``, the paper's teacher ensemble), returned as log-probabilities so the result is still a valid
  "logits" array for every export path.
- Preprocessing and export run in this process (threads, not processes): no copies of volumes through pipes or
  ``multiprocessing.Manager``, no extra interpreters importing torch. Preprocessing is stock's, with a
  slice-wise resampling that gives the same array (:mod:`noisy_student_nnunet.inference.preprocessing`).
- ``backend='auto'``: each patch goes through OpenVINO on the CPU (converted once per network, cached:
  :mod:`noisy_student_nnunet.inference.openvino_backend`), through torch on CUDA
  (:mod:`noisy_student_nnunet.inference.backend`). Only the network call on a patch changes.
- Files are written under a temporary name and renamed when complete.
- A case whose input is unusable (no channel suffix, wrong channel count, truncated gzip stream, unreadable,
  NaN) is reported and skipped, the other cases are predicted, and :class:`FailedCases` (naming every failed
  case and why) is raised at the end; stock stops at the first such case with a traceback.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from queue import Queue
from threading import Thread
from typing import Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.helpers import empty_cache
from tqdm import tqdm

from noisy_student_nnunet.errors import CaseError, NsnError, debug_enabled
from noisy_student_nnunet.inference.gaussian import compute_gaussian
from noisy_student_nnunet.inference.heap import map_large_allocations
from noisy_student_nnunet.inference.lazy_dynamo import OptimizedModule
from noisy_student_nnunet.inference.model_loading import load_trained_model
from noisy_student_nnunet.inference.export import (
    EXPORT_MODES,
    NEAREST,
    export_stock_with_probabilities,
    labels_in_original_geometry,
    write_labels,
)
from noisy_student_nnunet.inference.backend import Backend, choose_backend
from noisy_student_nnunet.inference.blocks import cpu_work_threads
from noisy_student_nnunet.inference.precision import Precision, choose_precision
from noisy_student_nnunet.inference.preprocessing import preprocess_case, preprocess_image, uses_stock_preprocessor
from noisy_student_nnunet.io_checks import check_channels_read, group_case_files, name_unreadable_file, \
    num_input_channels, read_checked, read_images_checked

FOLD_COMBINATIONS = ("logits", "softmax")


class FailedCases(NsnError):
    """Raised after every other case was predicted: ``failures`` maps each failed case id to why."""

    def __init__(self, failures: dict[str, str]):
        self.failures = dict(failures)
        super().__init__(f"{len(self.failures)} case(s) failed: " + "; ".join(
            f"{case}: {why}" for case, why in sorted(self.failures.items())))


def _case_id(files: Sequence[str], ofile: Optional[str]) -> str:
    return os.path.basename(ofile) if ofile is not None else os.path.basename(files[0]) if files else "?"


def _input_error(files: Sequence[str], plans_manager, error: Exception) -> str:
    """One line naming the file a case failed on: our checks name it; for a reader's error, read each file alone."""
    if isinstance(error, CaseError):
        return str(error)
    if debug_enabled():
        import traceback

        traceback.print_exception(error)
    return name_unreadable_file(files, plans_manager.image_reader_writer_class, error)


def iterate_preprocessed_cases(
    list_of_lists: Sequence[Sequence[str]],
    seg_from_prev_stage_files: Optional[Sequence[Optional[str]]],
    output_filenames_truncated: Optional[Sequence[str]],
    plans_manager,
    dataset_json: dict,
    configuration_manager,
    num_workers: int,
    verbose: bool = False,
    resample_threads: int = 1,
) -> Iterator[dict]:
    """Yield ``{'data', 'data_properties', 'ofile'}`` per case, in order (the items stock's iterators yield).

    ``num_workers`` threads preprocess ahead of the consumer, at most that many cases at a time; 0 runs inline.
    ``resample_threads``: threads of each case's 3D resampling (:func:`preprocess_case`).
    A case whose input fails the checks or the reader yields ``{'error': one line naming the file, 'ofile',
    'case'}`` instead, so that one bad case does not stop the others.
    """
    num_channels = num_input_channels(dataset_json)

    def one(i: int) -> dict:
        try:
            return preprocess(i)
        except Exception as error:  # the input of this case: reported, the other cases go on
            ofile = output_filenames_truncated[i] if output_filenames_truncated is not None else None
            return {"error": _input_error(list_of_lists[i], plans_manager, error), "ofile": ofile,
                    "case": _case_id(list_of_lists[i], ofile)}

    def preprocess(i: int) -> dict:
        prev_stage = seg_from_prev_stage_files[i] if seg_from_prev_stage_files is not None else None
        # a truncated .nii.gz reads "fine": its stream is checked as it is decompressed, or beside the read
        if uses_stock_preprocessor(configuration_manager, prev_stage):  # it reads the files itself
            data, properties = read_checked(list_of_lists[i], num_channels, lambda paths: preprocess_case(
                paths, prev_stage, plans_manager, configuration_manager, dataset_json, verbose, resample_threads))
        else:  # the read's decompressed copies are released before the preprocessing
            image, properties = read_images_checked(list_of_lists[i], num_channels,
                                                    plans_manager.image_reader_writer_class)
            data, properties = preprocess_image(image, properties, plans_manager, configuration_manager, verbose,
                                                resample_threads)
            del image
        if prev_stage is None:
            check_channels_read(list_of_lists[i], data.shape[0], num_channels)  # a 4D file holds several
        if not np.isfinite(data).all():
            raise CaseError(f"{list_of_lists[i][0]}: image contains NaN or infinite values")
        return {
            "data": torch.from_numpy(data),
            "data_properties": properties,
            "ofile": output_filenames_truncated[i] if output_filenames_truncated is not None else None,
        }

    n = len(list_of_lists)
    if num_workers <= 0 or n <= 1:
        for i in range(n):
            yield one(i)
        return
    with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="nsn-preprocess") as pool:
        pending: deque = deque()
        next_case = 0
        while next_case < n or pending:
            while next_case < n and len(pending) < num_workers:
                pending.append(pool.submit(one, next_case))
                next_case += 1
            yield pending.popleft().result()


#: at most this many elements per step of adding a patch to the accumulators: torch's ``at::internal::GRAIN_SIZE``,
#: below which an element-wise op runs in the calling thread without waking torch's other threads (the adds come
#: between the network's calls), and 128 KB of fp32, far below heap.py's mmap threshold
ADD_STEP_ELEMENTS = 32768


class LowFootprintPredictor(nnUNetPredictor):
    """Drop-in ``nnUNetPredictor`` with no TTA, fp16 storage, label-map export and on-the-fly fold averaging."""

    def __init__(self,
                 tile_step_size: float = 0.5,
                 use_gaussian: bool = True,
                 use_mirroring: bool = False,
                 perform_everything_on_device: bool = True,
                 device: torch.device = torch.device("cuda"),
                 verbose: bool = False,
                 verbose_preprocessing: bool = False,
                 allow_tqdm: bool = True,
                 export_mode: str = NEAREST,
                 fold_combination: str = "logits",
                 slab_bytes: int = 64 * 1024**2,
                 precision: str = "auto",
                 backend: str = "auto"):
        """``precision``: 'auto', 'fp32' or 'bf16' (see :func:`~noisy_student_nnunet.inference.precision.
        choose_precision`); ``backend``: 'auto', 'torch' or 'openvino' (:func:`~noisy_student_nnunet.inference.
        backend.choose_backend`); the choices and their reasons are printed once here."""
        if export_mode not in EXPORT_MODES:
            raise ValueError(f"export_mode must be one of {EXPORT_MODES}, got {export_mode!r}")
        if fold_combination not in FOLD_COMBINATIONS:
            raise ValueError(f"fold_combination must be one of {FOLD_COMBINATIONS}, got {fold_combination!r}")
        super().__init__(tile_step_size=tile_step_size, use_gaussian=use_gaussian, use_mirroring=use_mirroring,
                         perform_everything_on_device=perform_everything_on_device, device=device, verbose=verbose,
                         verbose_preprocessing=verbose_preprocessing, allow_tqdm=allow_tqdm)
        self.export_mode = export_mode
        self.fold_combination = fold_combination
        self.slab_bytes = int(slab_bytes)
        self.failed_cases: dict[str, str] = {}  #: case id -> why, of the last predict_from_files
        self.precision: Precision = choose_precision(precision, self.device)
        self.backend: Backend = choose_backend(backend, self.device)
        if self.backend.name == "openvino":
            map_large_allocations()  # a lower peak RSS (see heap.py), set before the first case is read
        self.model_folder: Optional[str] = None  #: where the OpenVINO cache goes beside the model
        self._openvino = None  # OpenVinoRunner, made at the first patch (it needs the input shape)
        self._loaded_weights: Optional[dict] = None  # the entry of list_of_parameters the network holds now
        self._digests: dict[int, tuple[dict, str]] = {}  # id(entry) -> (entry, its network_digest)
        print(f"LowFootprintPredictor: {self.precision.describe()}", flush=True)
        print(f"LowFootprintPredictor: {self.backend.describe()}", flush=True)

    def initialize_from_trained_model_folder(self, model_training_output_dir: str, use_folds,
                                             checkpoint_name: str = "checkpoint_final.pth"):
        """Stock's (read by :func:`~noisy_student_nnunet.inference.model_loading.load_trained_model`, without
        stock's import of every nnU-Net trainer), but a damaged or incompatible model file (truncated or foreign
        checkpoint, weights that do not fit the network ``plans.json`` builds, for any fold) is an NsnError naming
        the file (:mod:`noisy_student_nnunet.model_files`), not a torch traceback or a failure after the first
        case."""
        from noisy_student_nnunet import model_files

        try:
            folds = use_folds if use_folds is not None else \
                self.auto_detect_available_folds(model_training_output_dir, checkpoint_name)
            folds = [folds] if isinstance(folds, str) else list(folds)
            model = load_trained_model(model_training_output_dir, folds, checkpoint_name)
        except NsnError:
            raise
        except Exception as error:
            raise model_files.diagnose(model_training_output_dir, use_folds, checkpoint_name, error) from None
        self.manual_initialization(model.network, model.plans_manager, model.configuration_manager,
                                   model.parameters, model.dataset_json, model.trainer_name,
                                   model.inference_allowed_mirroring_axes)
        model_files.check_folds_fit(self.network, self.list_of_parameters, model_training_output_dir, folds,
                                    checkpoint_name)
        self.model_folder = model_training_output_dir

    # ------------------------------------------------------------------ prediction of logits
    def _keep_on_device(self) -> bool:
        return self.device.type == "cuda" and self.perform_everything_on_device

    def _row_ranges(self, x: torch.Tensor) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` along X of ``x`` (C, X, ...), each slab about ``slab_bytes`` in float32."""
        per_row = 4 * int(np.prod(x.shape)) // max(1, x.shape[1])
        rows = max(1, self.slab_bytes // max(1, per_row))
        for a in range(0, x.shape[1], rows):
            yield a, min(a + rows, x.shape[1])

    def _slabs(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Views of ``x`` (C, X, ...) along X, each about ``slab_bytes`` in float32."""
        for a, b in self._row_ranges(x):
            yield x[:, a:b]

    def _to_probabilities_(self, scores: torch.Tensor) -> None:
        """In place: logits -> probabilities (softmax, or sigmoid for regions), slab by slab."""
        for view in self._slabs(scores):
            view.copy_(self.label_manager.apply_inference_nonlin(view))

    def _to_log_probabilities_(self, probabilities: torch.Tensor) -> None:
        """In place: mean probabilities -> scores whose inference nonlinearity gives them back (log p / logit p)."""
        for view in self._slabs(probabilities):
            p = view.float().clamp_(1e-6, 1.0)
            if self.label_manager.has_regions:
                p = p.clamp_(max=1.0 - 1e-6)
                view.copy_(torch.log(p) - torch.log1p(-p))
            else:
                view.copy_(torch.log(p))

    def _openvino_runner(self, input_shape: Sequence[int]):
        """The OpenVINO runner for full patches of ``input_shape`` (made once; conversion and compilation happen
        at its first use for each set of weights)."""
        if self._openvino is None or self._openvino.input_shape != tuple(input_shape):
            from noisy_student_nnunet.inference.openvino_backend import OpenVinoRunner

            self._openvino = OpenVinoRunner(input_shape, self.precision.name, self.model_folder,
                                            threads=cpu_work_threads())
        return self._openvino

    def _weights_digest(self) -> Optional[str]:
        """The OpenVINO cache key of the fold the network holds now, hashed once per fold and not once per case
        (a fold switch rewrites every weight in place, so the runner alone would hash them all again for every
        fold of every case). None where the weights did not come from our fold loop."""
        entry = self._loaded_weights
        if entry is None:
            return None
        known = self._digests.get(id(entry))
        if known is None or known[0] is not entry:
            from noisy_student_nnunet.inference.openvino_backend import network_digest

            known = self._digests[id(entry)] = (entry, network_digest(self.network))
        return known[1]

    def _prepare_backend(self, num_channels: int) -> None:
        """Convert/load and compile for the loaded weights before the sliding window's progress bar starts."""
        if self.backend.name == "openvino":
            shape = (1, num_channels, *[int(p) for p in self.configuration_manager.patch_size])
            self._openvino_runner(shape).prepare(self.network, self._weights_digest())

    def _run_network(self, x: torch.Tensor) -> torch.Tensor:
        """The network on one patch, in the chosen backend and precision."""
        if self.backend.name == "openvino":
            return self._openvino_runner(tuple(x.shape))(self.network, x, self._weights_digest())
        with self.precision.autocast():
            return self.network(x)

    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        """Stock's network call (and mirrored calls with TTA) in this predictor's backend and precision; the result
        and the sum over mirrored passes are fp32 whatever the network ran in (a bf16 sum of 8 passes loses
        digits)."""
        prediction = self._run_network(x).float()
        if self.use_mirroring and self.allowed_mirroring_axes is not None:
            mirror_axes = [m + 2 for m in self.allowed_mirroring_axes]
            assert max(mirror_axes) <= x.ndim - 1, "mirror_axes does not match the dimension of the input!"
            combinations = [c for i in range(len(mirror_axes)) for c in itertools.combinations(mirror_axes, i + 1)]
            for axes in combinations:
                mirrored = self._run_network(torch.flip(x, axes))
                prediction += torch.flip(mirrored, axes).float()
                del mirrored
            prediction /= len(combinations) + 1
        return prediction

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers,
                                                       do_on_device: bool = True):
        """Stock's sliding window (fp16 accumulator, Gaussian weights, patch producer thread), except that the
        final division and the inf check run slab by slab: stock's whole-array ``torch.isinf`` allocates another
        C x voxels bytes (half the logits again) at the moment memory peaks."""
        predicted_logits = n_predictions = prediction = gaussian = workon = None
        results_device = self.device if do_on_device else torch.device("cpu")

        def producer(d, slh, q):
            for s in slh:
                q.put((torch.clone(d[s][None], memory_format=torch.contiguous_format).to(self.device), s))
            q.put("end")

        try:
            empty_cache(self.device)
            self._prepare_backend(data.shape[0])
            data = data.to(results_device)
            queue = Queue(maxsize=2)
            Thread(target=producer, args=(data, slicers, queue), daemon=True).start()
            predicted_logits = torch.zeros((self.label_manager.num_segmentation_heads, *data.shape[1:]),
                                           dtype=torch.half, device=results_device)
            n_predictions = torch.zeros(data.shape[1:], dtype=torch.half, device=results_device)
            gaussian = compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                        value_scaling_factor=10, device=results_device) if self.use_gaussian else 1
            with tqdm(desc=None, total=len(slicers), disable=not self.allow_tqdm) as pbar:
                while True:
                    item = queue.get()
                    if item == "end":
                        queue.task_done()
                        break
                    workon, sl = item
                    prediction = self._internal_maybe_mirror_and_predict(workon)[0].to(results_device)
                    self._add_weighted_patch_(predicted_logits, n_predictions, sl, prediction, gaussian)
                    # released before the next patch's network call: held, they would make that call's output
                    # (C x patch, 96 MB for 14 classes and a 40x224x192 patch) a second one at the peak
                    prediction = workon = None
                    queue.task_done()
                    pbar.update()
            queue.join()
            for a, b in self._row_ranges(predicted_logits):
                view = predicted_logits[:, a:b]
                torch.div(view, n_predictions[a:b], out=view)
                if torch.isinf(view).any():
                    raise RuntimeError("Encountered inf in predicted array. Aborting... If this problem persists, "
                                       "reduce value_scaling_factor in compute_gaussian or increase the dtype of "
                                       "predicted_logits to fp32")
            return predicted_logits
        except Exception:
            del predicted_logits, n_predictions, prediction, gaussian, workon
            empty_cache(self.device)
            empty_cache(results_device)
            raise

    @staticmethod
    def _add_weighted_patch_(predicted_logits: torch.Tensor, n_predictions: torch.Tensor, sl: tuple,
                             prediction: torch.Tensor, weights: torch.Tensor | float) -> None:
        """Stock's ``prediction *= weights; predicted_logits[sl] += prediction; n_predictions[sl[1:]] += weights``,
        bit for bit, one class and a few planes or rows (at most ADD_STEP_ELEMENTS) at a time, through two fp32
        buffers.

        Stock adds the fp32 product to the fp16 accumulator as ``fp16(fp32(fp32(acc) + product))``; here the same
        three roundings happen in explicit steps (the product into one buffer, the accumulator copied exactly into
        the other, their fp32 sum, copied back with fp16 rounding). torch would otherwise cast through temporaries
        the size of the operands (C x patch, 96 MB for 14 classes and a 40x224x192 patch, at the moment memory
        peaks), which the OpenVINO predictor maps afresh from the kernel (inference/heap.py). The multiply, folded
        into the steps, no longer makes a pass of its own over the patch (``benchmarks/bench_case_overheads.py``
        times both ways). ``prediction`` is left unchanged."""
        first = sl[1]
        if not isinstance(first, slice):  # a 2D configuration: sl[1] indexes one plane, and the patch is small
            predicted_logits[sl] += prediction * weights
            n_predictions[sl[1:]] += weights
            return
        depth, height, width = prediction.shape[1:]
        if height * width <= ADD_STEP_ELEMENTS:  # whole planes per step
            planes, rows = max(1, ADD_STEP_ELEMENTS // (height * width)), height
        else:  # rows of one plane per step
            planes, rows = 1, max(1, ADD_STEP_ELEMENTS // width)
        product = torch.empty((min(planes, depth), min(rows, height), width), dtype=torch.float32,
                              device=prediction.device)
        total = torch.empty_like(product)
        top = sl[2].start or 0
        weighted = isinstance(weights, torch.Tensor)
        for z in range(0, depth, planes):
            k = min(planes, depth - z)
            for y in range(0, height, rows):
                r = min(rows, height - y)
                here = (slice(first.start + z, first.start + z + k), slice(top + y, top + y + r), *sl[3:])
                step_weights = weights[z:z + k, y:y + r] if weighted else weights
                step_weights_fp32 = step_weights.float() if weighted else weights
                buffer, sum_ = product[:k, :r], total[:k, :r]
                for c in range(prediction.shape[0]):
                    accumulator = predicted_logits[(c, *here)]
                    torch.mul(prediction[c, z:z + k, y:y + r], step_weights_fp32, out=buffer)
                    sum_.copy_(accumulator)
                    sum_ += buffer
                    accumulator.copy_(sum_)
                n_predictions[here] += step_weights

    @staticmethod
    def _accumulate(total: torch.Tensor, fold: torch.Tensor) -> torch.Tensor:
        """``total += fold``; if the device runs out of memory, move the running sum to the CPU."""
        try:
            total += fold.to(total.device)
            return total
        except torch.OutOfMemoryError:
            total = total.cpu()
            total += fold.cpu()
            return total

    @torch.inference_mode()
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """fp16 ``(C, *data.shape[1:])``: logits averaged over folds (or log of the mean softmax).

        Stays on the GPU when ``perform_everything_on_device`` and the device is CUDA (falls back to the CPU when
        memory runs out), else on the CPU. On CPU the network runs in ``self.precision`` (fp32 or bf16; fp16
        convolutions are far slower there) and the accumulator is fp16, as in stock's sliding window. Threads: the
        caller's torch setting, at most the cores this process may use (no cap at ``nnUNet_def_n_proc``).
        """
        n_threads = torch.get_num_threads()
        torch.set_num_threads(cpu_work_threads())
        try:
            total = None
            for params in self.list_of_parameters:
                self._loaded_weights = None  # while loading, the network holds no known fold
                if not isinstance(self.network, OptimizedModule):
                    self.network.load_state_dict(params)
                else:
                    self.network._orig_mod.load_state_dict(params)
                self._loaded_weights = params
                fold = self.predict_sliding_window_return_logits(data)
                if not self._keep_on_device():
                    fold = fold.to("cpu")
                if self.fold_combination == "softmax":
                    self._to_probabilities_(fold)
                total = fold if total is None else self._accumulate(total, fold)
                del fold
            if len(self.list_of_parameters) > 1:
                total /= len(self.list_of_parameters)
            if self.fold_combination == "softmax":
                self._to_log_probabilities_(total)
        finally:
            self._loaded_weights = None
            torch.set_num_threads(n_threads)
        if self.verbose:
            print("Prediction done")
        return total

    # ------------------------------------------------------------------ export
    def export_case(self, logits: torch.Tensor, properties: dict, ofile: Optional[str],
                    save_probabilities: bool = False):
        """Write (``ofile`` given, returns None) or return one case's label map (and probabilities if asked),
        like stock's export functions."""
        if save_probabilities:
            if ofile is not None:
                export_stock_with_probabilities(logits, properties, self.configuration_manager, self.plans_manager,
                                                self.dataset_json, ofile)
                return None
            from nnunetv2.inference.export_prediction import \
                convert_predicted_logits_to_segmentation_with_correct_shape
            return convert_predicted_logits_to_segmentation_with_correct_shape(
                logits.detach().cpu().numpy(), self.plans_manager, self.configuration_manager, self.label_manager,
                properties, return_probabilities=True)
        labels = labels_in_original_geometry(logits, self.plans_manager, self.configuration_manager,
                                             self.label_manager, properties, self.export_mode, self.slab_bytes)
        if ofile is None:
            return labels
        write_labels(labels, ofile, self.plans_manager, self.dataset_json, properties)
        return None

    def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                   num_processes_segmentation_export: int = default_num_processes):
        """Predict every item of ``data_iterator`` (dicts with 'data', 'data_properties', 'ofile').

        ``num_processes_segmentation_export`` > 0: a background thread exports case i while case i + 1 is
        predicted (at most one export in flight, so at most two cases' logits in memory); 0: export inline.
        """
        results: List = []
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nsn-export") \
            if num_processes_segmentation_export > 0 else None
        pending = None
        try:
            for preprocessed in data_iterator:
                if "error" in preprocessed:
                    self._fail_case(preprocessed["case"], preprocessed["error"], preprocessed["ofile"])
                    continue
                data = preprocessed.pop("data")
                if isinstance(data, str):
                    delfile = data
                    data = torch.from_numpy(np.load(delfile))
                    os.remove(delfile)
                elif isinstance(data, np.ndarray):
                    data = torch.from_numpy(data)
                ofile, properties = preprocessed["ofile"], preprocessed["data_properties"]
                del preprocessed
                if ofile is not None:
                    print(f"\nPredicting {os.path.basename(ofile)}:")
                else:
                    print(f"\nPredicting image of shape {tuple(data.shape)}:")
                logits = self.predict_logits_from_preprocessed_data(data)
                del data
                if pool is None:
                    results.append(self.export_case(logits, properties, ofile, save_probabilities))
                else:
                    if pending is not None:
                        results.append(pending.result())
                    pending = pool.submit(self.export_case, logits, properties, ofile, save_probabilities)
                del logits
                if ofile is not None:
                    print(f"done with {os.path.basename(ofile)}")
            if pending is not None:
                results.append(pending.result())
                pending = None
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        finish = getattr(data_iterator, "_finish", None)
        if callable(finish):
            finish()
        compute_gaussian.cache_clear()
        empty_cache(self.device)
        return results

    # ------------------------------------------------------------------ failed cases
    def _fail_case(self, case: str, message: str, ofile: Optional[str] = None) -> None:
        """Record a case that cannot be predicted; remove an output of an earlier run for it (it would not be
        the prediction of this input)."""
        self.failed_cases[case] = message
        print(f"\ncase {case} failed, skipped: {message}", flush=True)
        if ofile is not None:
            for suffix in (self.dataset_json["file_ending"], ".npz", ".pkl"):
                if os.path.isfile(ofile + suffix):
                    os.remove(ofile + suffix)

    def predict_from_files(self,
                           list_of_lists_or_source_folder: Union[str, List[List[str]]],
                           output_folder_or_list_of_truncated_output_files: Union[str, None, List[str]],
                           save_probabilities: bool = False,
                           overwrite: bool = True,
                           num_processes_preprocessing: int = default_num_processes,
                           num_processes_segmentation_export: int = default_num_processes,
                           folder_with_segs_from_prev_stage: str = None,
                           num_parts: int = 1,
                           part_id: int = 0):
        """Stock's (same signature: stock records it in predict_from_raw_data_args.json); cases with unusable
        input are skipped, and :class:`FailedCases` is raised after the others are done."""
        self.failed_cases = {}
        result = super().predict_from_files(list_of_lists_or_source_folder,
                                            output_folder_or_list_of_truncated_output_files, save_probabilities,
                                            overwrite, num_processes_preprocessing, num_processes_segmentation_export,
                                            folder_with_segs_from_prev_stage, num_parts, part_id)
        if self.failed_cases:
            raise FailedCases(self.failed_cases)
        return result

    # ------------------------------------------------------------------ inputs
    def _manage_input_and_output_lists(self, list_of_lists_or_source_folder, output_folder_or_list=None,
                                       folder_with_segs_from_prev_stage=None, overwrite: bool = True,
                                       part_id: int = 0, num_parts: int = 1, save_probabilities: bool = False):
        """Stock's, but a source folder is listed in this process (stock forks a pool of 12 processes for it,
        each a copy-on-write image of this one with the model loaded) and checked: a file without nnU-Net's
        channel suffix, or a case without exactly the model's channels, is a failed case of the part it falls
        in (the problem cases are sharded like the good ones), not a traceback later."""
        if isinstance(list_of_lists_or_source_folder, str):
            folder, ending = list_of_lists_or_source_folder, self.dataset_json["file_ending"]
            num_channels = num_input_channels(self.dataset_json)
            cases = group_case_files(folder, ending, num_channels)
            for case in sorted(cases.problems)[part_id::num_parts]:
                ofile = os.path.join(output_folder_or_list, case) if isinstance(output_folder_or_list, str) \
                    and overwrite else None
                self._fail_case(case, cases.problems[case], ofile)
            list_of_lists_or_source_folder = [[str(p) for p in cases.files[case]] for case in sorted(cases.files)]
        return super()._manage_input_and_output_lists(list_of_lists_or_source_folder, output_folder_or_list,
                                                      folder_with_segs_from_prev_stage, overwrite, part_id,
                                                      num_parts, save_probabilities)

    def _internal_get_data_iterator_from_lists_of_filenames(self, input_list_of_lists: List[List[str]],
                                                            seg_from_prev_stage_files: Union[List[str], None],
                                                            output_filenames_truncated: Union[List[str], None],
                                                            num_processes: int):
        return iterate_preprocessed_cases(input_list_of_lists, seg_from_prev_stage_files,
                                          output_filenames_truncated, self.plans_manager, self.dataset_json,
                                          self.configuration_manager, num_processes, self.verbose_preprocessing,
                                          resample_threads=cpu_work_threads())

    def predict_from_files_sequential(self,
                                      list_of_lists_or_source_folder: Union[str, List[List[str]]],
                                      output_folder_or_list_of_truncated_output_files: Union[str, None, List[str]],
                                      save_probabilities: bool = False,
                                      overwrite: bool = True,
                                      folder_with_segs_from_prev_stage: str = None):
        """Stock's no-multiprocessing entry: here the same as ``predict_from_files`` with no worker threads."""
        return self.predict_from_files(list_of_lists_or_source_folder,
                                       output_folder_or_list_of_truncated_output_files,
                                       save_probabilities=save_probabilities, overwrite=overwrite,
                                       num_processes_preprocessing=0, num_processes_segmentation_export=0,
                                       folder_with_segs_from_prev_stage=folder_with_segs_from_prev_stage)

    def predict_single_npy_array(self, input_image: np.ndarray, image_properties: dict,
                                 segmentation_previous_stage: np.ndarray = None,
                                 output_file_truncated: str = None,
                                 save_or_return_probabilities: bool = False):
        """Stock's single-array entry with this predictor's logits and export."""
        from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy

        ppa = PreprocessAdapterFromNpy([input_image], [segmentation_previous_stage], [image_properties],
                                       [output_file_truncated], self.plans_manager, self.dataset_json,
                                       self.configuration_manager, num_threads_in_multithreaded=1,
                                       verbose=self.verbose)
        dct = next(ppa)
        logits = self.predict_logits_from_preprocessed_data(dct["data"])
        return self.export_case(logits, dct["data_properties"], output_file_truncated,
                                save_or_return_probabilities)
