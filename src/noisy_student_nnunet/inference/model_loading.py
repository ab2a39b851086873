"""A trained model folder's network and weights, read as stock's predictor reads them, minus its trainer search.

Stock's ``initialize_from_trained_model_folder`` needs the trainer class only for its ``build_network_architecture``
and finds it with ``recursive_find_trainer_class_by_name``, which imports each module under
``nnunetv2.training.nnUNetTrainer`` until one defines the name. Ours live outside that package, so it imports all
of them (Primus, timm, torchvision and torch._dynamo come with them): measured with nnunetv2 2.8.1, 198 MB of
resident memory and 3.3 s, and 81 MB and 1.9 s more for nnUNetTrainer's own module, in every prediction process.

Trainers known to build their network as nnUNetTrainer does (:data:`PLANS_NETWORK_TRAINERS`: nnUNetTrainer and ours,
which do not override it; a test holds them to that) are built here the same way, with
``get_network_from_plans``. Any other trainer name goes through stock's search, as in stock.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

#: trainer names whose network is nnUNetTrainer.build_network_architecture's (tests/test_model_loading.py checks ours)
PLANS_NETWORK_TRAINERS = frozenset({
    "nnUNetTrainer",
    "NoisyStudentTeacherTrainer",
    "NoisyStudentTrainer",
    "NoisyStudentFinetuneTrainer",
})


@dataclass
class TrainedModel:
    """What stock's predictor keeps of a model folder (the arguments of its ``manual_initialization``)."""

    network: torch.nn.Module
    plans_manager: PlansManager
    configuration_manager: ConfigurationManager
    parameters: list[dict]
    dataset_json: dict
    trainer_name: str
    inference_allowed_mirroring_axes: Optional[tuple]


def build_network(trainer_name: str, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                  dataset_json: dict) -> torch.nn.Module:
    """The network the trainer ``trainer_name`` trains for these plans, without deep supervision (for inference)."""
    num_inputs = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    num_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    if trainer_name in PLANS_NETWORK_TRAINERS:
        return get_network_from_plans(configuration_manager.network_arch_class_name,
                                      configuration_manager.network_arch_init_kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      num_inputs, num_outputs, allow_init=True, deep_supervision=False)
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    if "plans_manager" in inspect.signature(trainer_class.build_network_architecture).parameters:
        return trainer_class.build_network_architecture(plans_manager, configuration_manager, num_inputs,
                                                        num_outputs, enable_deep_supervision=False)
    return trainer_class.build_network_architecture(  # the old signature, which stock 2.8.1 still accepts
        configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import, num_inputs, num_outputs,
        enable_deep_supervision=False)


def load_trained_model(model_folder: str, folds: Sequence[Union[int, str]],
                       checkpoint_name: str = "checkpoint_final.pth") -> TrainedModel:
    """Stock's reading of ``model_folder`` (plans, dataset.json, each fold's checkpoint; the network holds the first
    fold's weights, as stock's does since nnU-Net's GitHub issue #2520)."""
    dataset_json = load_json(os.path.join(model_folder, "dataset.json"))
    plans_manager = PlansManager(load_json(os.path.join(model_folder, "plans.json")))
    parameters: list[dict] = []
    trainer_name = configuration_name = mirroring_axes = None
    for i, fold in enumerate(folds):
        fold = int(fold) if fold != "all" else fold
        checkpoint = torch.load(os.path.join(model_folder, f"fold_{fold}", checkpoint_name),
                                map_location=torch.device("cpu"), weights_only=False)
        if i == 0:
            trainer_name = checkpoint["trainer_name"]
            configuration_name = checkpoint["init_args"]["configuration"]
            mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes")
        parameters.append(checkpoint["network_weights"])
        del checkpoint  # the optimizer state goes before the next fold is read
    configuration_manager = plans_manager.get_configuration(configuration_name)
    network = build_network(trainer_name, plans_manager, configuration_manager, dataset_json)
    network.load_state_dict(parameters[0])
    return TrainedModel(network, plans_manager, configuration_manager, parameters, dataset_json, trainer_name,
                        mirroring_axes)
