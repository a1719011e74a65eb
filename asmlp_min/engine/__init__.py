"""The training engine: one loop for classification, detection and segmentation, in modules of one job each.

    config.py       TrainConfig: every setting once (name, type, default, help), task defaults, validation
    distributed.py  DistEnv, process group, seeds, generator states, all-reduce / gather
    optim.py        AdamW parameter groups, lr_factor (warm-up + cosine / poly / step), build_optimizer
    data.py         TaskData: shapes or a dataset folder, transforms, the loader
    tasks.py        build_model and the three task adapters (prepare, loss, evaluate)
    inference.py    evaluate, predict, load_trained, load_released
    runs.py         run folder and its lock, strict_json, reading and checking a run's checkpoint
    trainer.py      Trainer: the loop
"""
from .config import (AUGMENTATIONS, DET_MAX_SIZE_RATIO, FOLDER_IMAGE_SIZE, PATCH_SIZE, SCHEDULES, TASK_DEFAULTS, TASKS,
                     TrainConfig)
from .data import DataError, TaskData, WorkerDied, build_data, task_transforms
from .distributed import DistEnv, PeerStopped, init_distributed, rng_state, seed_everything, set_rng_state
from .inference import evaluate, load_for_inference, load_released, load_trained, predict
from .optim import build_optimizer, lr_factor, param_groups
from .runs import (CHECKPOINT_FORMAT, CHECKPOINT_NAME, RUN_FILES, _check_label_set, _read_engine_checkpoint,
                   new_folders_removed_on_failure, prepare_output_folder, run_folder_lock, strict_json)
from .tasks import ClassificationTask, DetectionTask, SegmentationTask, build_model, make_task
from .trainer import NonFiniteLossError, Trainer
