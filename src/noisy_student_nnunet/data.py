"""Mixed minibatches: labeled and pseudo-labeled cases in every batch (paper, section 2.2).

The noisy student draws every training minibatch from two preprocessed datasets at a fixed ratio
(the paper: 1 labeled for 3 pseudo-labeled). This module holds that logic as plain functions and two
small classes, testable without training a network:

* :func:`global_slots` lays out the global batch as *slots*: the ratio's group (``[L, P, P, P]``)
  repeated until the batch is full. Each slot knows its source and whether nnU-Net's foreground
  oversampling forces it to contain foreground. The oversampling rule is stock nnU-Net's, applied to
  the global batch: the last ``B - round(B * (1 - p))`` slots are forced
  (``nnUNetDataLoader._oversample_last_XX_percent`` and ``nnUNetTrainer._set_batch_size_and_oversample``).
* :func:`rank_composition` gives one rank its contiguous slice of the global slots, with stock's split of
  the global batch across ``-num_gpus`` ranks (:func:`rank_batch_sizes`). The ranks together always
  hold exactly the global ratio and the global number of oversampled patches.
* :class:`MixedDataset` puts both datasets under one namespace: keys ``labeled:case_001`` and
  ``pseudo:case_001``. Each source keeps its own dataset object (folder, file format), so case
  identifiers that occur in both datasets never collide.
* :class:`MixedBatchLoader` is nnU-Net's ``nnUNetDataLoader`` over that namespace that fills sample ``j``
  from slot ``j``'s source with slot ``j``'s foreground flag. Cropping, transforms and the preallocated
  batch stay stock's, in one loader: mixing adds no copy and no extra pass. It is a batchgenerators
  ``DataLoader`` (infinite), so nnU-Net's ``SingleThreadedAugmenter`` and ``NonDetMultiThreadedAugmenter``
  wrap it as they wrap stock loaders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from noisy_student_nnunet.errors import NsnError

LABELED = "labeled"
PSEUDO = "pseudo"
SOURCES = (LABELED, PSEUDO)


@dataclass(frozen=True)
class Slot:
    """One sample position of the global minibatch."""

    index: int  #: position in the global batch
    source: str  #: LABELED or PSEUDO
    force_fg: bool  #: stock foreground oversampling guarantees foreground in this patch


@dataclass(frozen=True)
class RankComposition:
    """What one rank's minibatch holds: its slots and, per source, how many samples and which are forced."""

    rank: int
    world_size: int
    slots: tuple[Slot, ...]

    @property
    def batch_size(self) -> int:
        return len(self.slots)

    def count(self, source: str) -> int:
        return sum(slot.source == source for slot in self.slots)

    def force_fg(self, source: str) -> tuple[bool, ...]:
        """Foreground flags of ``source``'s samples, in the order its loader fills them."""
        return tuple(slot.force_fg for slot in self.slots if slot.source == source)

    @property
    def n_labeled(self) -> int:
        return self.count(LABELED)

    @property
    def n_pseudo(self) -> int:
        return self.count(PSEUDO)

    def __str__(self) -> str:  # nnU-Net's debug.json stores str() of trainer attributes
        return self.describe()

    def describe(self) -> str:
        layout = "".join("L" if s.source == LABELED else "P" for s in self.slots)
        forced = "".join("f" if s.force_fg else "." for s in self.slots)
        return (f"rank {self.rank}/{self.world_size}: {self.n_labeled} labeled + {self.n_pseudo} pseudo-labeled "
                f"(global slots {self.slots[0].index}..{self.slots[-1].index}: {layout}, foreground forced: {forced})")


def rank_batch_sizes(global_batch_size: int, world_size: int) -> list[int]:
    """Per-rank batch sizes, exactly as ``nnUNetTrainer._set_batch_size_and_oversample`` splits the batch."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if global_batch_size < world_size:
        raise NsnError(f"cannot split batch size {global_batch_size} across {world_size} GPUs")
    sizes = [global_batch_size // world_size] * world_size
    sizes = [s + 1 if s * world_size + i < global_batch_size else s for i, s in enumerate(sizes)]
    assert sum(sizes) == global_batch_size
    return sizes


def global_slots(batch_size: int, labeled_per_batch: int, pseudo_per_batch: int,
                 oversample_foreground_percent: float) -> list[Slot]:
    """The global minibatch as slots: the group ``[L]*labeled + [P]*pseudo`` repeated, stock oversampling.

    ``batch_size`` must be a multiple of ``labeled_per_batch + pseudo_per_batch`` so that every minibatch
    holds the exact ratio. With ``pseudo_per_batch == 0`` all slots are labeled (a stock batch).
    """
    if labeled_per_batch < 1 or pseudo_per_batch < 0:
        raise NsnError(f"student.labeled_per_batch must be >= 1 and student.pseudo_per_batch >= 0, "
                       f"got {labeled_per_batch} and {pseudo_per_batch}")
    group = [LABELED] * labeled_per_batch + [PSEUDO] * pseudo_per_batch
    if batch_size < 1 or batch_size % len(group) != 0:
        raise NsnError(f"batch size {batch_size} (plans) is not a multiple of student.labeled_per_batch + "
                       f"student.pseudo_per_batch = {len(group)}")
    first_forced = round(batch_size * (1 - oversample_foreground_percent))
    return [Slot(index=i, source=group[i % len(group)], force_fg=not i < first_forced) for i in range(batch_size)]


def rank_composition(batch_size: int, labeled_per_batch: int, pseudo_per_batch: int,
                     oversample_foreground_percent: float, world_size: int = 1, rank: int = 0) -> RankComposition:
    """The slots of ``rank``: its contiguous slice of :func:`global_slots`, sliced like stock nnU-Net."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    slots = global_slots(batch_size, labeled_per_batch, pseudo_per_batch, oversample_foreground_percent)
    sizes = rank_batch_sizes(batch_size, world_size)
    low = sum(sizes[:rank])
    return RankComposition(rank=rank, world_size=world_size, slots=tuple(slots[low:low + sizes[rank]]))


def split_key(key: str) -> tuple[str, str]:
    """``"pseudo:case_001"`` -> ``("pseudo", "case_001")``: the source and identifier of a mixed batch key."""
    source, _, identifier = str(key).partition(":")
    if source not in SOURCES or not identifier:
        raise ValueError(f"not a mixed batch key: {key!r}")
    return source, identifier


class MixedDataset:
    """Several nnU-Net datasets under one namespace: case ``ID`` of source ``S`` is key ``"S:ID"``.

    Each source keeps its own dataset object (its folder, its file format), so equal identifiers in two
    datasets never collide. It offers what ``nnUNetDataLoader`` uses of a dataset: ``identifiers`` and
    ``load_case``.
    """

    def __init__(self, datasets: dict[str, Any]):
        for source in datasets:
            if source not in SOURCES:
                raise ValueError(f"unknown source {source!r}")
        self.datasets = dict(datasets)
        self.keys_by_source = {source: [f"{source}:{i}" for i in dataset.identifiers]
                               for source, dataset in self.datasets.items()}
        self.identifiers = [key for keys in self.keys_by_source.values() for key in keys]

    def load_case(self, key: str):
        source, identifier = split_key(key)
        return self.datasets[source].load_case(identifier)

    def __getitem__(self, key: str):
        return self.load_case(key)


class MixedBatchLoader(nnUNetDataLoader):
    """nnU-Net's data loader whose minibatch follows a :class:`RankComposition`, slot by slot.

    Sample ``j`` is a random case of slot ``j``'s source, foreground-forced iff the slot is (stock's rule
    on the global batch; ``probabilistic_oversampling`` keeps stock's per-sample coin flip instead).
    Everything else (cropping, padding, transforms, the preallocated batch) is stock
    ``generate_train_batch``: one loader, so mixing costs no extra copy. The batch has nnU-Net's format,
    keys namespaced (``labeled:case_001``), plus ``sources``. Being a batchgenerators ``DataLoader``
    (infinite), nnU-Net's ``SingleThreadedAugmenter`` and ``NonDetMultiThreadedAugmenter`` wrap it.
    """

    def __init__(self, datasets: dict[str, Any], composition: RankComposition, patch_size, final_patch_size,
                 label_manager, oversample_foreground_percent: float = 0.0,
                 probabilistic_oversampling: bool = False, transforms=None):
        data = MixedDataset(datasets)
        for source in set(slot.source for slot in composition.slots):
            if not data.keys_by_source.get(source):
                raise NsnError(f"the {source} training set is empty but the minibatch needs "
                               f"{composition.count(source)} {source} case(s)")
        super().__init__(data, composition.batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=oversample_foreground_percent, sampling_probabilities=None,
                         pad_sides=None, probabilistic_oversampling=probabilistic_oversampling,
                         transforms=transforms)
        self.composition = composition
        self.slot_sources = [slot.source for slot in composition.slots]
        self.force_fg = [slot.force_fg for slot in composition.slots]
        if not probabilistic_oversampling:
            self.get_do_oversample = self._slot_oversample

    def _slot_oversample(self, sample_idx: int) -> bool:
        return self.force_fg[sample_idx]

    def get_indices(self) -> np.ndarray:
        keys = self._data.keys_by_source
        return np.array([keys[source][np.random.randint(len(keys[source]))] for source in self.slot_sources])

    def get_bbox(self, data_shape, force_fg, class_locations, overwrite_class=None, verbose=False):
        # With an "ignore" label stock crops random patches around annotated voxels, which nnU-Net's
        # preprocessing lists only for datasets that have that label. A case of the other dataset (no
        # ignore voxels: everything annotated) gets stock's plain random crop, the same distribution.
        if self.has_ignore and not force_fg and self.annotated_classes_key not in class_locations:
            self.has_ignore = False
            try:
                return super().get_bbox(data_shape, force_fg, class_locations, overwrite_class, verbose)
            finally:
                self.has_ignore = True
        return super().get_bbox(data_shape, force_fg, class_locations, overwrite_class, verbose)

    def generate_train_batch(self) -> dict[str, Any]:
        batch = super().generate_train_batch()
        batch["sources"] = [split_key(key)[0] for key in batch["keys"]]
        return batch


def build_mixed_loader(composition: RankComposition, labeled_dataset, pseudo_dataset, patch_size,
                       final_patch_size, label_manager, transforms, oversample_foreground_percent: float,
                       probabilistic_oversampling: bool = False) -> MixedBatchLoader:
    """The training loader of one rank over the sources its ``composition`` uses."""
    datasets = {LABELED: labeled_dataset}
    if composition.n_pseudo > 0:
        if pseudo_dataset is None:
            raise NsnError("the minibatch needs pseudo-labeled cases but no pseudo-labeled dataset was given")
        datasets[PSEUDO] = pseudo_dataset
    return MixedBatchLoader(datasets, composition, patch_size, final_patch_size, label_manager,
                            oversample_foreground_percent=oversample_foreground_percent,
                            probabilistic_oversampling=probabilistic_oversampling, transforms=transforms)
