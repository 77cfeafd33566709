r"""Experiment presets: every default of the project lives here.

Select one with `--config=config.py:NAME` and override any field, e.g.
`--config=config.py:digits --config.pretrain.epochs=5`. The returned ConfigDict
is locked: an unknown field or a value of the wrong type is an error.

  cifar10  The paper's CIFAR-10 recipe (METHOD.md sections 4 to 7), WRN-28-2,
           4000 labels. Expected: 96.0 % top-1 after 600 epochs + fine-tuning
           (the paper's number, not measured here).
             python paws_train.py --config=config.py:cifar10 --workdir=runs/c10
             python fine_tune.py  --config=config.py:cifar10 --workdir=runs/c10
             python nn_eval.py    --config=config.py:cifar10 --workdir=runs/c10
  digits   The same pipeline on scikit-learn's bundled 8x8 digits (upsampled to
           16 px), 10 labels per class, a small WRN and a short schedule so the
           three scripts finish on a 2-core CPU in minutes (measured accuracy and
           time over 12 label seeds: docs/results.md).
  imagenet The paper's ImageNet recipe (METHOD.md section 10): ResNet-50, 2 x 224 + 6 x 96 px views,
           15 classes x 7 supports per replica, 64 images per replica on 64 GPUs, 100 epochs, then
           a classifier fine-tuned on the labeled subset. Images streamed from --data_dir
           (IN/train/<wnid>/, IN/val/<wnid>/, or tfrecord); the reference's 10 % / 1 % subsets as --split_file
           name lists, imagenet_subsets/90percent.txt (128 116 names: the 10 % labels) or 99percent.txt
           (12 811: the 1 %), with data.labeled_per_class=0 (the lists are not balanced per class).
           Expected: 75.5 % top-1 with 10 % labels, 66.5 % with 1 % after 300 epochs + fine-tuning
           (the paper's numbers, not measured here; docs/data.md, ImageNet).
             python paws_train.py --config=config.py:imagenet --data_dir=IN --workdir=runs/in \
               --split_file=90percent.txt --config.data.labeled_per_class=0
             python fine_tune.py  --config=config.py:imagenet --data_dir=IN --workdir=runs/in
             python nn_eval.py    --config=config.py:imagenet --data_dir=IN --workdir=runs/in
"""

import ml_collections


def base_config():
  """Fields shared by all presets; values are the paper's CIFAR-10 ones."""
  c = ml_collections.ConfigDict()
  c.name = "cifar10"
  c.seed = 0  # augmentation and initialisation stream

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "cifar10"  # or digits; or "folder" / "tfrecord" / "tfds" with --data_dir (docs/data.md)
  # tfrecord: globs of the training and validation files, relative to --data_dir (Model Garden's names).
  c.data.train_files = "train-*"
  c.data.val_files = "validation-*"
  # tfds: the dataset prepared in --data_dir (TFDS's data_dir), NAME[/CONFIG][:VERSION] (docs/data.md, TFDS).
  c.data.tfds_name = "cifar10"
  c.data.image_size = 32
  c.data.labeled_per_class = 400  # 4000 labels (METHOD.md section 4)
  c.data.label_seed = 152
  c.data.mean = (0.4914, 0.4822, 0.4465)
  c.data.std = (0.2023, 0.1994, 0.2010)
  c.data.large_crop_size = 32
  c.data.small_crop_size = 18
  c.data.large_crop_scale = (0.75, 1.0)
  c.data.small_crop_scale = (0.3, 0.75)
  c.data.flip = True
  c.data.color_jitter_prob = 0.8
  c.data.color_jitter_strength = 0.5
  c.data.solarize_prob = 0.2
  c.data.equalize_prob = 0.2
  # The ImageNet recipe's RandomGrayscale (p 0.2) and GaussianBlur (p 0.5, PIL radius ~ U[0.1, 2.0]),
  # after the colour jitter; not used on CIFAR-10 (METHOD.md section 4).
  c.data.grayscale_prob = 0.0
  c.data.blur_prob = 0.0
  c.data.blur_radius = (0.1, 2.0)

  c.model = ml_collections.ConfigDict()
  # Trunk: "wrn" (WideResNet-depth-width) or "resnet50" (the paper's ImageNet ResNet-50, torchvision layout,
  # 2048-d; depth and width unused; the ImageNet heads are hidden_dim = projection_dim = 2048,
  # prediction_hidden_dim = 512 with prediction_head on).
  c.model.name = "wrn"
  c.model.depth = 28
  c.model.width = 2
  c.model.hidden_dim = 128
  c.model.projection_dim = 128
  c.model.prediction_head = False
  c.model.prediction_hidden_dim = 32

  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.epochs = 600
  c.pretrain.warmup_epochs = 10
  c.pretrain.batch_size = 256  # unlabeled images per step, all replicas
  c.pretrain.multicrop = 6
  c.pretrain.classes_per_batch = 10
  c.pretrain.images_per_class = 64  # support images per class, all replicas
  c.pretrain.support_views = 2
  # False: every replica draws the same classes_per_batch classes (the gathered support set is what one
  # device would draw). True: each replica draws its own classes_per_batch classes, different from the
  # other replicas' in the same step, as the reference does on ImageNet (its unique_classes_per_rank).
  c.pretrain.unique_classes_per_replica = False
  c.pretrain.label_smoothing = 0.1
  c.pretrain.tau = 0.1
  c.pretrain.sharpen_T = 0.25
  c.pretrain.me_max = True
  c.pretrain.start_lr = 0.8
  c.pretrain.lr = 3.2
  c.pretrain.final_lr = 0.032
  c.pretrain.momentum = 0.9
  c.pretrain.weight_decay = 1e-6
  c.pretrain.lars_eta = 0.001

  c.finetune = ml_collections.ConfigDict()
  # "suncet": SuNCEt on the whole encoder (the paper's CIFAR-10 fine-tuning, METHOD.md section 6);
  # "classifier": the reference's ImageNet fine-tuning, a linear classifier (METHOD.md section 10).
  c.finetune.mode = "suncet"
  c.finetune.batch_size = 256  # classifier mode only: labeled images per step, all replicas
  c.finetune.epochs = 30
  c.finetune.classes_per_batch = 10
  c.finetune.images_per_class = 64
  c.finetune.views = 2
  c.finetune.tau = 0.1
  c.finetune.lr = 0.1
  c.finetune.final_lr = 0.01
  c.finetune.momentum = 0.9
  c.finetune.weight_decay = 0.0
  c.finetune.lars_eta = 0.001

  c.eval = ml_collections.ConfigDict()
  c.eval.tau = 0.1
  c.eval.batch_size = 1000
  # Beside soft-NN, nn_eval.py reports on the same embeddings (utils/evaluation.py; docs/running.md, Evaluation):
  # weighted k-NN, cosine similarity, the knn_k nearest supports voting with weight exp(similarity /
  # knn_temperature) (InstDisc / DINO's k = 20, T = 0.07; knn_k = 0 turns it off), and a linear probe,
  # scikit-learn logistic regression on the frozen, L2-normalised embeddings of the labeled images.
  c.eval.knn_k = 20
  c.eval.knn_temperature = 0.07
  c.eval.linear_probe = True

  # How the step runs; none of these change the maths.
  c.run = ml_collections.ConfigDict()
  # auto: mixed_float16 on GPU (as the reference's fp16 autocast), mixed_bfloat16 on CPUs with AMX (where
  # it was measured faster), else float32; or name one of the three (docs/running.md, Precision).
  c.run.precision = "auto"
  c.run.jit_compile = "auto"  # auto = on with a GPU, off on CPU (slower there: docs/results.md)
  c.run.distribution = "auto"  # auto / one_device / mirrored / multi_worker
  # N >= 2: split the CPU into N logical devices and mirror over them, a rehearsal of a multi-GPU run on a
  # laptop or CI (docs/running.md, Before a long GPU run); 0 = off.
  c.run.cpu_replicas = 0
  c.run.steps_per_loop = 1
  c.run.log_every = 10
  c.run.checkpoint_every = 500  # steps; also at every epoch end
  c.run.keep_checkpoints = 3
  # Multi-worker (TF_CONFIG): seconds after which a worker that stopped answering (killed, preempted,
  # unreachable) counts as lost; the others then stop with one error line naming it and the last checkpoint
  # (utils/devices.py watch_peers; docs/running.md). 10 s is TensorFlow's own default.
  c.run.collective_timeout = 10.0
  # grpc://HOST:PORT of a tf.data service dispatcher: the training input is built on its workers (other
  # machines), the same batches as without it (docs/running.md, Input on other machines); "" = on this host.
  c.run.data_service = ""
  return c


def digits_config():
  c = base_config()
  c.name = "digits"
  c.data.dataset = "digits"
  c.data.image_size = 16
  # 10 labels per class, 100 of the 1347 training images (7.4 %): the label fraction of the paper's CIFAR-10
  # setting (4000 of 50 000, 8 %). With 4 per class (3 %) about one label draw in six collapsed two classes
  # into one (docs/results.md, The earlier 4-labels-per-class preset).
  c.data.labeled_per_class = 10
  c.data.mean = (0.5, 0.5, 0.5)
  c.data.std = (0.5, 0.5, 0.5)
  c.data.large_crop_size = 16
  c.data.small_crop_size = 10
  # Digits are not mirror-symmetric and are grey: no flip, no colour distortion.
  c.data.flip = False
  c.data.color_jitter_prob = 0.0
  c.data.solarize_prob = 0.0
  c.data.equalize_prob = 0.0
  c.model.depth = 10
  c.model.width = 1
  c.pretrain.epochs = 30
  c.pretrain.warmup_epochs = 2
  c.pretrain.batch_size = 128
  c.pretrain.images_per_class = 5  # support images per class and step: half of the labeled ones, drawn afresh
  # Fine-tuning: the paper's 30 epochs, of 2 steps (5 of the 10 labeled images per class each). One view:
  # without flips a second view is an identical copy, and SuNCEt then only learns to find each image's
  # duplicate. Learning rate 0.01 -> 0.001, a tenth of the paper's: at 0.1 the SuNCEt loss on 40 images
  # jumped to log(10) within 3 steps for some encoders (one went from 95.1 % pre-trained to 27.6 %), at
  # 0.01 it fell smoothly.
  c.finetune.images_per_class = 5
  c.finetune.views = 1
  c.finetune.lr = 0.01
  c.finetune.final_lr = 0.001
  c.eval.batch_size = 500
  c.run.log_every = 5
  c.run.checkpoint_every = 100
  return c


def imagenet_config():
  """The reference's configs/paws/imgnt_train.yaml and imgnt_fine_tune.yaml (METHOD.md section 10)."""
  c = base_config()
  c.name = "imagenet"
  # DIR/train/<wnid>/*.JPEG and DIR/val/<wnid>/; --config.data.dataset=tfrecord or tfds (imagenet2012) also work
  c.data.dataset = "folder"
  c.data.tfds_name = "imagenet2012"
  c.data.image_size = 224
  # 10 % of the labels is about 128 images per class (1 %: --config.data.labeled_per_class=13) when the
  # subset is drawn by data.label_seed. The reference's subsets are lists of file names
  # (n01440764_10026.JPEG) named by the unlabeled fraction: imagenet_subsets/90percent.txt holds the 10 %
  # labels (128 116 names), 99percent.txt the 1 % (12 811). They are not balanced per class: give them with
  # paws_train.py --split_file=90percent.txt --config.data.labeled_per_class=0 (with data.dataset=tfds, TFDS's
  # copy of the same lists: --split_file=tfds:imagenet2012_subset/10pct, or /1pct).
  c.data.labeled_per_class = 128
  c.data.mean = (0.485, 0.456, 0.406)
  c.data.std = (0.229, 0.224, 0.225)
  c.data.large_crop_size = 224
  c.data.small_crop_size = 96
  c.data.large_crop_scale = (0.14, 1.0)
  c.data.small_crop_scale = (0.05, 0.14)
  c.data.flip = True
  c.data.color_jitter_prob = 0.8
  c.data.color_jitter_strength = 1.0  # ColorJitter(0.8, 0.8, 0.8, 0.2)
  c.data.grayscale_prob = 0.2
  c.data.blur_prob = 0.5
  c.data.blur_radius = (0.1, 2.0)
  c.data.solarize_prob = 0.0
  c.data.equalize_prob = 0.0

  c.model.name = "resnet50"
  c.model.hidden_dim = 2048
  c.model.projection_dim = 2048
  c.model.prediction_head = True
  c.model.prediction_hidden_dim = 512

  # The paper ran 64 GPUs x 64 unlabeled images = 4096 per step. Batch sizes here count all replicas:
  # with R replicas keep 64 per replica (batch_size = 64 R, images_per_class = 7 R) and scale the three
  # learning rates by 64 R / 4096, as the reference's configs scale with the global batch (docs/data.md, ImageNet).
  c.pretrain.epochs = 100  # the paper's best ImageNet row trains 300
  c.pretrain.warmup_epochs = 10
  c.pretrain.batch_size = 4096  # 64 per replica x 64 replicas
  c.pretrain.multicrop = 6
  # The reference: 15 classes x 7 images per replica, each replica its own 15 classes (960 classes per
  # step on 64 GPUs). images_per_class counts all replicas: 7 per replica x 64 replicas.
  c.pretrain.classes_per_batch = 15
  c.pretrain.images_per_class = 7 * 64
  c.pretrain.support_views = 1
  c.pretrain.unique_classes_per_replica = True
  c.pretrain.label_smoothing = 0.1
  c.pretrain.start_lr = 0.3
  c.pretrain.lr = 6.4
  c.pretrain.final_lr = 0.064
  c.pretrain.weight_decay = 1e-6

  # Fine-tuning as the reference does it on ImageNet: trunk + the projection head's first block + a
  # zero-initialised linear classifier, cross-entropy on the labeled subset, RandomResizedCrop(224,
  # scale (0.08, 1)) + flip, SGD Nesterov 0.9 (no LARS), lr 0.02 cosine to 0, no weight decay, 50 epochs
  # (utils/model/classifier.py).
  c.finetune.mode = "classifier"
  # The reference fine-tunes with 256 images per process (per GPU) and its README launches it on 4 GPUs:
  # 1024 = 256 per replica x 4 replicas. Its lr 0.02 is not scaled with the GPU count (docs/data.md, ImageNet).
  c.finetune.batch_size = 1024
  c.finetune.epochs = 50
  c.finetune.lr = 0.02
  c.finetune.final_lr = 0.0
  c.finetune.momentum = 0.9
  c.finetune.weight_decay = 0.0
  # Soft-NN evaluation (nn_eval.py) batches of 224 px images.
  c.eval.batch_size = 256
  # The linear probe on 128 116 (10 %) embeddings of 2048 dims in 1000 classes is a long scikit-learn fit on
  # the host, not measured here: off in this preset; --config.eval.linear_probe=true turns it on.
  c.eval.linear_probe = False
  c.run.log_every = 50
  c.run.checkpoint_every = 1000
  return c


PRESETS = {"cifar10": base_config, "digits": digits_config, "imagenet": imagenet_config}


def get_config(name="cifar10"):
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
  config = PRESETS[name]()
  config.lock()
  return config
