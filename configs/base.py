"""Shared defaults for every ssr_jax run: the PASCAL VOC recipe (WeCLIP's VOC settings, §1).

Every field is declared here (the config is locked); voc.py adds nothing, coco.py and demo.py
override only what differs.

Section references ("§1.4") point at the SSR method specification (docs/method.md in the
steering repo, summarised in the README). Fields tagged [inferred] are our reconstruction of
unpublished SSR details and exist so that ablations are one flag away.
"""

import ml_collections

from ssr_jax.clip.prompts import VOC_BG, VOC_FG


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 1  # WeCLIP trains with seed 1 (§1.7).

  # ---------------------------------------------------------------- frozen CLIP
  c.clip = ml_collections.ConfigDict()
  c.clip.weights = ""  # Local HF dir (config.json + model.safetensors), OpenAI .pt, or cache .npz.
  c.clip.pos_interp = "bilinear"  # Position-embedding resize: bilinear (WeCLIP) or bicubic.
  # Where converted weights are cached; "" = $XDG_CACHE_HOME/ssr_jax (or ~/.cache/ssr_jax).
  c.clip.cache_dir = ""

  # ---------------------------------------------------------------- frozen DINO (§3.1)
  c.dino = ml_collections.ConfigDict()
  # Local HF dir (config.json + model.safetensors, e.g. facebook/dino-vits16), the official
  # dino_deitsmall16_pretrain.pth, or a converted .npz; "" = no DINO (then SGC's paper affinity
  # needs model.cam.dino_weight = 0).
  c.dino.weights = ""
  c.dino.cache_dir = ""  # Where a .pth is converted to; "" = as clip.cache_dir.

  # ---------------------------------------------------------------- model (§1-§3)
  c.model = ml_collections.ConfigDict()
  c.model.dtype = "float32"  # Compute dtype: float32 or bfloat16 (params stay float32).
  # Foreground names (synonyms comma-separated), §1.2; () = the dataset's (folder: classes.txt).
  c.model.class_names = VOC_FG
  # Background names for the CAM softmax, §1.2; () = the dataset's (folder: background.txt).
  c.model.bg_names = VOC_BG
  c.model.prompt_template = "a clean origami {}."  # WeCLIP's single template.
  c.model.normalization = "imagenet"  # Input statistics: imagenet (WeCLIP quirk, §1.1) or clip.
  # Kmax: present classes per image padded to this (VOC 6, COCO 20); 0 = the most any image of
  # the dataset has (folder datasets).
  c.model.max_classes = 6
  c.model.logit_scale = 100.0  # CLIP's exp(logit_scale) used in the GradCAM softmax, §1.3.

  c.model.decoder = ml_collections.ConfigDict()
  c.model.decoder.embed_dim = 256  # Per-layer MLP width and fused feature width F, §1.5.
  c.model.decoder.num_layers = 3  # Transformer blocks after fusion.
  c.model.decoder.num_heads = 8
  c.model.decoder.dropout = 0.1  # Dropout2d after the 1x1 fuse conv.

  c.model.cam = ml_collections.ConfigDict()
  c.model.cam.source = "cmpa"  # GradCAM logits through CMPA's heads (paper) or frozen CLIP's.
  # Affinity = (1 - w) CLIP attention + w DINO attention, rows normalised (paper: 0.4 : 0.6, §3.1);
  # after the RFM switch RFM's affinity takes CLIP's place. 0 = CLIP alone (no DINO needed).
  c.model.cam.dino_weight = 0.6
  c.model.cam.dino_layers = 4  # [inferred] DINO's last layers averaged (heads averaged).
  c.model.cam.num_attn_layers = 8  # Pre-RFM affinity: mean of the last 8 attention maps, §1.4.1.
  c.model.cam.rfm_layers = 6  # RFM candidate layers (VOC 6, COCO 10), §1.4.2.
  c.model.cam.rfm_switch_step = 9000  # Train step from which RFM affinity is used (§1.4 quirk).
  c.model.cam.sinkhorn_iters = 3  # Column-then-row normalisations, §1.4.3.
  c.model.cam.box_threshold = 0.4  # Box-mask threshold, fraction of the CAM max (VOC .4/COCO .7).
  c.model.cam.bg_power = 1.0  # bg = (1 - max cam) ** bg_power, WeCLIP's cam_bg_thres.
  c.model.cam.par_dilations = (1, 2, 4, 8, 12, 24)  # PAR neighbourhood, §1.4.8.
  c.model.cam.par_iters = 20
  c.model.cam.par_w_pos = 0.01
  c.model.cam.par_temp = 0.3

  # CMPA (§2): trainable ISA/TSA heads on CLIP's image and text features, the initial CAMs
  # computed through them, a K-means prototype bank and the prototype contrastive loss.
  c.model.cmpa = ml_collections.ConfigDict()
  c.model.cmpa.enabled = True
  c.model.cmpa.site = "clip"  # clip: the paper's heads on CLIP features; decoder: [v1] (§2.7).
  c.model.cmpa.hidden = (512,)  # [inferred] Widths of the heads' Linear -> BN -> ReLU layers.
  c.model.cmpa.out_dim = 256  # [inferred] d2, the width of the shared prototype space.
  c.model.cmpa.bn_momentum = 0.9  # Running BN statistics (flax convention; PyTorch's 0.1).
  c.model.cmpa.weight = 1.0  # Weight of L_proto (paper: L_proto + 0.1 L_seg, loss.seg_weight).
  c.model.cmpa.temperature = 0.05  # Initial tau of the learnable temperature (paper).
  c.model.cmpa.refresh_every = 5000  # K-means refresh of the prototypes, in steps (paper).
  c.model.cmpa.bank_size = 16384  # [inferred] Latest (image, class) samples kept (VOC ~ 1 pass).
  c.model.cmpa.kmeans_iters = 10  # [inferred] Lloyd iterations per refresh.
  c.model.cmpa.positive = "cluster"  # cluster: nearest prototype (paper); class: the label.
  c.model.cmpa.symmetric_weight = 1.0  # [inferred] TSA text features vs image prototypes.
  # cross: image features vs text prototypes (Eq. 6, the paper's CMPA); intra: each modality vs
  # its own prototypes (Table 4's intra-modal contrast row, 57.8 vs 63.3 on VOC).
  c.model.cmpa.contrast = "cross"
  c.model.cmpa.cam_pooling = "tokens"  # [inferred] GradCAM image feature: mean of ISA(tokens).
  # [inferred] Heads' CAMs from this step (frozen CLIP's before: untrained heads are random).
  c.model.cmpa.cam_start_step = c.model.cmpa.get_ref("refresh_every") * 1
  c.model.cmpa.cam_scale = 0.0  # GradCAM softmax scale through the heads; 0 = 1/tau (learned).
  c.model.cmpa.decoder = ml_collections.ConfigDict()  # [v1] site "decoder" only (§2.7).
  c.model.cmpa.decoder.weight = 0.1  # lambda_cmpa.
  c.model.cmpa.decoder.temperature = 0.07
  c.model.cmpa.decoder.proj = "linear"  # Projection head 256->D_text: linear or mlp.
  c.model.cmpa.decoder.min_pixels = 2  # A class region smaller than this gives no prototype.
  c.model.cmpa.decoder.soft = False  # Soft masked-average pooling with refined CAMs.
  c.model.cmpa.decoder.bg_text = "mean"  # Background text prototype: mean of bg names, or best.
  c.model.cmpa.decoder.pixel_weight = 0.0  # Weight of the pixel-to-text prototype term.
  c.model.cmpa.decoder.warmup_steps = 0  # CMPA loss is zero before this step.
  c.model.cmpa.decoder.cam_fusion = False  # Add the text-driven map to GradCAM after RFM.

  # SGC (§3): target colour regions (K-means of the SLIC superpixels by colour, precomputed) per
  # class; affinity columns outside them are zeroed before propagation.
  c.model.sgc = ml_collections.ConfigDict()
  c.model.sgc.enabled = True
  c.model.sgc.grouping = "clusters"  # clusters: the paper's colour regions; superpixels: [v1].
  # [inferred] A region is a target of class c when the share of its activation from patches with
  # cam_c >= high_threshold is >= ratio_threshold (both unstated; high = the box threshold).
  c.model.sgc.high_threshold = 0.4  # VOC .4 / COCO .7, as the box threshold.
  c.model.sgc.ratio_threshold = 0.5
  c.model.sgc.replace_box = False  # [inferred] Column mask within WeCLIP's box mask, or instead.
  c.model.sgc.hard = False  # Binarise the patch masks at 0.5 (else a patch's fraction inside).
  # [v1] grouping "superpixels" only (§3.6):
  c.model.sgc.threshold = 0.4  # tau_sp: target superpixels, fraction of the max pooled CAM.
  c.model.sgc.receiver_mask = False  # Variant B: also mask receiving patches (dilated u_c).
  c.model.sgc.soft_alpha = 1.0  # Variant C: T *= alpha + (1-alpha)*[share a superpixel]; 1 = off.
  c.model.sgc.max_superpixels = 512  # S_max: superpixel ids >= this are folded (keep > count).

  # ---------------------------------------------------------------- losses (§1.6)
  c.loss = ml_collections.ConfigDict()
  # The paper's L = L_proto + 0.1 L_seg; WeCLIP's affinity loss is kept at 0.1 of seg (§4).
  c.loss.seg_weight = 0.1
  c.loss.aff_weight = 0.01
  c.loss.aff_radius = 8  # Affinity-loss window in patches.

  # ---------------------------------------------------------------- data (§1.1, §3.1)
  c.data = ml_collections.ConfigDict()
  c.data.name = "voc"  # voc, coco, synthetic or folder (your own images: configs/folder.py).
  c.data.root = ""  # VOC: VOCdevkit/VOC2012 (or VOCdevkit); COCO: converted root.
  c.data.train_split = "train_aug"
  c.data.val_split = "val"
  c.data.num_classes = 21  # Including background; 0 = the dataset's (folder: classes.txt).
  c.data.labels_file = ""  # "id v1 v2 ..." image labels (mask values); "" = from the dataset/masks.
  c.data.ignore_label = 255
  c.data.source = (
    "files"  # files: data.root's folders; tfds: a build (python -m ssr_jax.data.tfds_build).
  )
  c.data.tfds_data_dir = ""  # The builds' folder for source tfds: local path or gs://bucket/...
  c.data.pipeline = "auto"  # tf, numpy, or auto (tf when TensorFlow imports, else numpy).
  c.data.crop_size = 320
  c.data.scale_range = (0.5, 2.0)
  c.data.hflip = True
  c.data.color_jitter = 0.0  # Brightness/contrast/saturation strength; WeCLIP uses none.
  # Parallel decode/augment calls of the numpy pipeline (used where TensorFlow is absent, as on
  # our GPU host), in threads or processes: on a 16-core H100 host 12 processes gave 692 img/s,
  # 12 threads 301 (GIL), and the bf16 step consumes 325 img/s.
  c.data.num_workers = 12
  c.data.worker_type = "process"
  c.data.prefetch = 2
  # Start-up check of the training split's files (data/check.py), every bad file in one error:
  # headers (sizes, modes, truncation from the file's end marker; cheap), full (decode every file
  # as training will), or none.
  c.data.verify = "headers"
  c.data.superpixel_dir = ""  # "" = <root>/Superpixels_<backend>_<n_segments>[_s<s>][_i<it>].
  # Superpixels: opencv (ximgproc SLIC) at half resolution, 5 iterations: ~9x faster than the
  # skimage reference (skimage, 1, 10) at equal ASA (ssr_jax/data/superpixels.py docstring).
  c.data.superpixel_backend = "opencv"  # opencv (ximgproc SLIC) or skimage (SLIC, reference).
  c.data.n_segments = 100  # Per 320x320 area; scaled by image area (§3.1).
  c.data.superpixel_scale = 2  # SLIC on the image block-averaged by this, labels upscaled.
  c.data.slic_iterations = 5  # SLIC iterations (10 = skimage's default).
  c.data.compactness = 10.0
  c.data.sigma = 1.0
  c.data.color_clusters = 8  # K of SGC's per-image K-means over superpixel mean Lab (§3.2).
  c.data.cluster_position_weight = 0.0  # K-means weight of mean (y, x) in [0, 1]; 0 = colour only.
  c.data.synthetic = ml_collections.ConfigDict()  # Only read when data.name == "synthetic".
  c.data.synthetic.num_train = 512
  c.data.synthetic.num_val = 128
  c.data.synthetic.image_size = 128
  c.data.synthetic.seed = 0
  # The world's dials (synthetic.World; defaults = the original world): co-occurrence of touching
  # classes (CMPA's failure mode) and class-correlated backgrounds (SGC's), as probabilities.
  c.data.synthetic.rider_on_horse = 0.75  # P(a horse carries a rider).
  c.data.synthetic.rider_alone = 0.0  # P(a horse group is a lone rider instead).
  c.data.synthetic.boat_on_water = 0.9  # P(water | a boat sets the scene).
  c.data.synthetic.car_on_road = 0.8  # P(road | a car sets the scene).
  c.data.synthetic.bird_in_sky = 0.8  # P(sky | a bird sets the scene).
  c.data.synthetic.water_without_boat = 0.0  # P(water | another class sets the scene).
  c.data.folder = ml_collections.ConfigDict()  # Only read when data.name == "folder".
  # Without a split column in labels.csv: this fraction of the images is held out as "val"
  # (chosen by the sha256 of "<split_seed>/<image path>": the same on every run and host).
  c.data.folder.val_fraction = 0.1
  c.data.folder.split_seed = 0

  # ---------------------------------------------------------------- training (§1.7)
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 4  # Global batch.
  c.train.num_steps = 30000
  c.train.learning_rate = 2e-3  # Decoder lr (WeCLIP's 2e-4 x 10).
  c.train.warmup_steps = 50
  c.train.warmup_ratio = 1e-6  # Warm-up starts at lr * warmup_ratio.
  c.train.schedule = "poly"  # poly or cosine.
  c.train.poly_power = 1.0
  c.train.weight_decay = 0.01
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  c.train.grad_clip = 0.0  # Global-norm clip; 0 = off (WeCLIP has none).
  # CMPA's heads and temperature: their own AdamW group, same warm-up/decay shape (§4: the
  # paper's lr 1e-5, wd 2e-3; ambiguous whether they are the heads' or the whole model's).
  c.train.heads = ml_collections.ConfigDict()
  c.train.heads.learning_rate = 1e-5
  c.train.heads.weight_decay = 2e-3  # Not applied to the log-temperature.
  c.train.checkpoint_every = 2000
  c.train.keep_checkpoints = 3
  c.train.log_every = 50
  c.train.eval_every = 0  # 0 = no eval during training.
  c.train.nan_policy = "halt"  # halt or skip when a loss/gradient is non-finite.
  # Several processes (hosts): launch.py calls jax.distributed.initialize() before any device is
  # touched. Empty / 0 = auto-detect (Cloud TPU pods, SLURM, Open MPI); set all three to start
  # processes by hand (coordinator "host:port", process_id 0..num_processes-1).
  c.train.distributed = False
  c.train.coordinator_address = ""
  c.train.num_processes = 0
  c.train.process_id = 0

  # ---------------------------------------------------------------- evaluation (§1.8)
  c.eval = ml_collections.ConfigDict()
  # Scored in turn; () = (data.val_split,), so own split lists need setting once. WSSS papers
  # report cam/pseudo on train: e.g. ("val", "train").
  c.eval.splits = ()
  # What eval mode scores: seg (decoder), cam (GradCAM of model.cam.source), clip_cam (GradCAM of
  # frozen CLIP: the paper's reference row) and/or pseudo (refined pseudo-labels).
  c.eval.targets = ("seg",)
  c.eval.scales = (1.0, 0.75)
  c.eval.flip = True
  c.eval.long_side = 512  # Resize the long side to this before multi-scale inference.
  c.eval.batch_size = 8  # Global eval batch at most (batches are no larger than a size group).
  c.eval.checkpoint_step = -1  # -1 = latest.
  c.eval.max_images = 0  # 0 = the whole split.
  c.eval.num_vis = 16  # Visualisation grids written under workdir/eval.
  c.eval.save_png = True
  c.eval.crf = False  # Dense CRF post-processing (needs pydensecrf2).
  c.eval.crf_iters = 10
  c.eval.crf_pos_xy_std = 3.0
  c.eval.crf_pos_w = 3.0
  c.eval.crf_bi_xy_std = 64.0
  c.eval.crf_bi_rgb_std = 5.0
  c.eval.crf_bi_w = 4.0

  # ---------------------------------------------------------------- --mode ablation
  c.ablation = ml_collections.ConfigDict()
  c.ablation.num_seeds = 3  # Every row trained with seeds seed, seed + 1, ... (mean ± std).
  c.ablation.rows = ()  # Row keys to run (experiment.VARIANTS, "configured"); () = all.

  # ---------------------------------------------------------------- demo (configs/demo.py)
  c.demo = ml_collections.ConfigDict()
  # False: the tiny CLIP shipped with the package (made by the settings below); True: pretrain
  # one in the workdir (needed when a clip_* field differs from the shipped one's).
  c.demo.pretrain_clip = False
  c.demo.clip_seed = 0
  c.demo.clip_save_every = 100  # Orbax checkpoint interval (<workdir>/clip_pretrain; resumable).
  c.demo.clip_steps = 0  # Steps of in-process tiny-CLIP pretraining (demo only).
  c.demo.clip_images = 4096  # Size of the decorrelated synthetic stream the tiny CLIP sees.
  c.demo.clip_batch_size = 64
  c.demo.clip_lr = 1e-3
  c.demo.clip_width = 128
  c.demo.clip_layers = 6
  c.demo.clip_patch = 16
  # The demo's tiny DINO (self-distillation on the generator's unlabelled stream): shipped like
  # the tiny CLIP, or pretrained in the workdir with pretrain_dino=True.
  c.demo.pretrain_dino = False
  c.demo.dino_seed = 0
  c.demo.dino_steps = 0
  c.demo.dino_save_every = 100  # Orbax checkpoint interval (<workdir>/dino_pretrain; resumable).
  c.demo.dino_eval_every = 0  # Log the val attention purity every N steps; 0 = only at the end.
  c.demo.dino_batch_size = 64
  c.demo.dino_lr = 5e-4
  c.demo.dino_width = 96
  c.demo.dino_layers = 3
  c.demo.dino_heads = 3
  c.demo.dino_patch = 8

  c.lock()
  return c
