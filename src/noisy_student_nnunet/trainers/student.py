"""The noisy student: labeled and pseudo-labeled cases in every minibatch, Table 5 augmentation.

Paper, sections 2.2 and 3.2: the student has the teacher's architecture and protocol; every minibatch
holds labeled cases of the fold's training split and pseudo-labeled cases (1:3 in the paper); all
pseudo-labeled cases join every fold's training set; validation stays the labeled fold's.

Only :meth:`get_dataloaders` changes (stock hard-codes one ``nnUNetDataLoader``): the training loader is a
:class:`~noisy_student_nnunet.data.MixedBatchLoader` over both datasets, wrapped by stock's augmenters.
Batch layout, multi-GPU split and foreground oversampling are the pure functions of
:mod:`noisy_student_nnunet.data`; locating and checking the pseudo-labeled dataset is
:mod:`noisy_student_nnunet.trainers.pseudo_source`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from noisy_student_nnunet.data import RankComposition, build_mixed_loader, rank_composition
from noisy_student_nnunet.trainers.pseudo_source import PseudoDataset, locate_pseudo_dataset
from noisy_student_nnunet.trainers.base import RecipeTrainer


class NoisyStudentTrainer(RecipeTrainer):
    """Stock nnU-Net training on mixed labeled/pseudo-labeled minibatches (recipe block ``student``)."""

    schedule_key = "training"
    augmentation_key = "student_augmentation"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        student = self.recipe["student"]
        self.labeled_per_batch: int = student["labeled_per_batch"]
        self.pseudo_per_batch: int = student["pseudo_per_batch"]
        #: set in get_dataloaders (they are only needed for training, not for --val or inference)
        self.pseudo_dataset: PseudoDataset | None = None
        self.batch_composition: RankComposition | None = None
        self.global_oversample_foreground_percent: float = self.oversample_foreground_percent

    def _set_batch_size_and_oversample(self):
        # stock overwrites oversample_foreground_percent with a per-rank value under DDP; the slots
        # need the global one
        self.global_oversample_foreground_percent = self.oversample_foreground_percent
        super()._set_batch_size_and_oversample()

    def compute_batch_composition(self) -> RankComposition:
        """This rank's share of the global batch (plans' batch size, recipe ratio, stock DDP split)."""
        world_size = dist.get_world_size() if self.is_ddp else 1
        rank = dist.get_rank() if self.is_ddp else 0
        composition = rank_composition(self.configuration_manager.batch_size, self.labeled_per_batch,
                                       self.pseudo_per_batch, self.global_oversample_foreground_percent,
                                       world_size=world_size, rank=rank)
        if composition.batch_size != self.batch_size:  # our split must be stock's
            raise RuntimeError(f"rank {rank}: {composition.batch_size} slots but stock batch size {self.batch_size}")
        return composition

    def get_pseudo_dataset(self):
        """The nnU-Net dataset of all pseudo-labeled cases (every fold trains on all of them)."""
        if self.pseudo_dataset is None:
            self.pseudo_dataset = locate_pseudo_dataset(self.plans_manager.plans, self.configuration_name,
                                                        self.dataset_json, self.recipe)
            self.print_to_log_file(f"pseudo-labeled dataset: {self.pseudo_dataset.name}, "
                                   f"{len(self.pseudo_dataset.identifiers)} cases in {self.pseudo_dataset.folder}")
        dataset_class = infer_dataset_class(str(self.pseudo_dataset.folder))
        return dataset_class(str(self.pseudo_dataset.folder), list(self.pseudo_dataset.identifiers),
                             folder_with_segs_from_previous_stage=None)

    def use_ignore_label_of_pseudo_dataset(self):
        """Train with the pseudo-labeled dataset's "ignore" label (``nsn pseudolabel --ignore-below``).

        The loss must skip those voxels, so the trainer's label manager and loss switch to the pseudo-labeled
        dataset.json's labels (the same classes plus "ignore"). Labeled cases have no ignore voxels; the
        mixed loader crops them as stock does without an ignore label. The results folder keeps the labeled
        dataset.json, so inference is unchanged.
        """
        self.label_manager = self.plans_manager.get_label_manager(self.pseudo_dataset.dataset_json)
        self.loss = self._build_loss()
        self.print_to_log_file(f"pseudo-labels mark low-confidence voxels with ignore label "
                               f"{self.label_manager.ignore_label}: the loss skips them")
        return self.label_manager

    def get_dataloaders(self):
        """Stock ``get_dataloaders`` with the mixed training loader; validation loader and augmenters as stock."""
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        if self.is_cascaded:
            raise NotImplementedError("NoisyStudentTrainer does not support cascaded configurations")
        self.batch_composition = self.compute_batch_composition()
        dataset_pseudo = self.get_pseudo_dataset() if self.batch_composition.n_pseudo > 0 else None
        labeled_label_manager = self.label_manager
        if dataset_pseudo is not None and self.pseudo_dataset.ignore_label is not None \
                and not self.label_manager.has_ignore_label:
            self.use_ignore_label_of_pseudo_dataset()

        patch_size = self.configuration_manager.patch_size
        deep_supervision_scales = self._get_deep_supervision_scales()
        rotation_for_DA, do_dummy_2d_data_aug, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        regions = self.label_manager.foreground_regions if self.label_manager.has_regions else None
        tr_transforms = self.get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels, regions=regions,
            ignore_label=self.label_manager.ignore_label)
        val_transforms = self.get_validation_transforms(
            deep_supervision_scales, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels, regions=regions,
            ignore_label=self.label_manager.ignore_label)

        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        self.print_to_log_file(f"minibatch: {self.batch_composition.describe()}; labeled training cases: "
                               f"{len(dataset_tr.identifiers)}, pseudo-labeled: "
                               f"{len(dataset_pseudo.identifiers) if dataset_pseudo is not None else 0}, "
                               f"validation (labeled only): {len(dataset_val.identifiers)}")
        dl_tr = build_mixed_loader(self.batch_composition, dataset_tr, dataset_pseudo, initial_patch_size,
                                   patch_size, self.label_manager, tr_transforms,
                                   oversample_foreground_percent=self.global_oversample_foreground_percent,
                                   probabilistic_oversampling=self.probabilistic_oversampling)
        dl_val = nnUNetDataLoader(dataset_val, self.batch_size, patch_size, patch_size, labeled_label_manager,
                                  oversample_foreground_percent=self.oversample_foreground_percent,
                                  sampling_probabilities=None, pad_sides=None, transforms=val_transforms,
                                  probabilistic_oversampling=self.probabilistic_oversampling)

        allowed_num_processes = get_allowed_n_proc_DA()
        if allowed_num_processes == 0:
            mt_gen_train = SingleThreadedAugmenter(dl_tr, None)
            mt_gen_val = SingleThreadedAugmenter(dl_val, None)
        else:
            pin_memory = self.device.type == "cuda"
            mt_gen_train = NonDetMultiThreadedAugmenter(
                data_loader=dl_tr, transform=None, num_processes=allowed_num_processes,
                num_cached=max(6, allowed_num_processes // 2), seeds=None, pin_memory=pin_memory, wait_time=0.002)
            mt_gen_val = NonDetMultiThreadedAugmenter(
                data_loader=dl_val, transform=None, num_processes=max(1, allowed_num_processes // 2),
                num_cached=max(3, allowed_num_processes // 4), seeds=None, pin_memory=pin_memory, wait_time=0.002)
        _ = next(mt_gen_train)
        _ = next(mt_gen_val)
        return mt_gen_train, mt_gen_val

    def on_train_start(self):
        super().on_train_start()
        # stock unpacks only the labeled folder (a no-op for blosc2, npz -> npy for numpy datasets)
        if self.pseudo_dataset is not None:
            if self.local_rank == 0:
                infer_dataset_class(str(self.pseudo_dataset.folder)).unpack_dataset(
                    str(self.pseudo_dataset.folder), overwrite_existing=False,
                    num_processes=max(1, round(get_allowed_n_proc_DA() // 2)), verify=True)
            if self.is_ddp:
                dist.barrier()

