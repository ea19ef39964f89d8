# Copyright 2026 The m2d2_hf authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
"""transformers' own common tests (ModelTesterMixin, ConfigTester, the feature-extraction, processor and pipeline
mixins) run against every M2D2 class, as in-tree models are tested.

The mixins come from the sdist of the installed transformers version (see tests/transformers_common_suite.py); the
whole module skips with the reason when that sdist cannot be obtained (no network on a first run).
A flag below turns a common test off only where it cannot apply to an audio model, with the reason beside it.
(The `# Copyright` header above is read by `test_can_init_all_missing_weights`, which skips files without one.)
"""

import unittest

import numpy as np
import pytest
import torch
from parameterized import parameterized
from transformers import AutoTokenizer, BertConfig

from m2d2_hf import (
    M2D2AudioConfig,
    M2D2AudioModel,
    M2D2ClapModel,
    M2D2Config,
    M2D2FeatureExtractor,
    M2D2ForAudioClassification,
    M2D2ForPreTraining,
    M2D2PreTrainingConfig,
    M2D2Processor,
)

from .conftest import minilm_dir
from .transformers_common_suite import CommonTestsUnavailable, load_common_tests, see_registered_models_as_in_tree


try:
    _common = load_common_tests()
except CommonTestsUnavailable as error:
    pytest.skip(f"transformers' common test mixins are unavailable: {error}", allow_module_level=True)

_modeling = _common["test_modeling_common"]
see_registered_models_as_in_tree(_modeling)
ModelTesterMixin = _modeling.ModelTesterMixin
floats_tensor, ids_tensor, random_attention_mask = (
    _modeling.floats_tensor,
    _modeling.ids_tensor,
    _modeling.random_attention_mask,
)
ConfigTester = _common["test_configuration_common"].ConfigTester
SequenceFeatureExtractionTestMixin = _common[
    "test_sequence_feature_extraction_common"
].SequenceFeatureExtractionTestMixin
FeatureExtractionSavingTestMixin = _common["test_feature_extraction_common"].FeatureExtractionSavingTestMixin
ProcessorTesterMixin = _common["test_processing_common"].ProcessorTesterMixin
PipelineTesterMixin = _common["test_pipeline_mixin"].PipelineTesterMixin
EAGER_MATCHES_SDPA_CASES = _modeling.TEST_EAGER_MATCHES_SDPA_INFERENCE_PARAMETERIZATION


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The mixins run hundreds of tiny models, where waking a second thread costs more than it saves: on 2 cores
    the module takes ~16 s on one thread and ~57 s on two. The previous setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class M2D2AudioModelTester:
    """Tiny random M2D2 audio encoders: 8 mel bins, 4x4 patches, one 16-frame chunk = 2 x 4 patch tokens."""

    def __init__(self, parent, batch_size=3, frames=16, is_training=True):
        self.parent = parent
        self.batch_size = batch_size
        self.frames = frames
        self.is_training = is_training
        self.num_mel_bins = 8
        self.patch_size = [4, 4]
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.intermediate_size = 37
        self.num_labels = 3
        # Patch tokens per clip (hidden_states and last_hidden_state leave the CLS token out) and the attention
        # maps' length (CLS + tokens).
        self.seq_length = (self.num_mel_bins // 4) * (frames // 4)
        self.encoder_seq_length = self.seq_length + 1
        self.key_length = self.encoder_seq_length

    def get_config(self) -> M2D2AudioConfig:
        return M2D2AudioConfig(**self.config_kwargs())

    def config_kwargs(self) -> dict:
        return dict(
            num_mel_bins=self.num_mel_bins,
            patch_size=self.patch_size,
            chunk_frames=16,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            num_labels=self.num_labels,
        )

    def prepare_config_and_inputs(self):
        input_features = floats_tensor([self.batch_size, self.num_mel_bins, self.frames])
        labels = ids_tensor([self.batch_size], self.num_labels)
        return self.get_config(), input_features, labels

    def prepare_config_and_inputs_for_common(self):
        config, input_features, _ = self.prepare_config_and_inputs()
        return config, {"input_features": input_features}


# PipelineTesterMixin runs a task on the Hub's tiny model of each class (hf-internal-testing/tiny-random-<class>,
# listed in tests/utils/tiny_model_summary.json) with transformers' tests/pipelines/ task tests, and only for in-tree
# tokenizer / feature-extractor classes (it looks their names up in the transformers module). None of that exists
# for M2D2 or offline (the sdist has no tests/pipelines/), so its tests skip here ("Could not find any model
# architecture in the tiny models JSON file"); the mappings still state the tasks the package supports, as the
# in-tree AST and CLAP tests do. transformers' real pipelines are run on these classes by tests/test_pipeline.py and
# tests/test_pipeline_batching.py (batching, input forms, per-clip equality).
class M2D2AudioModelTest(ModelTesterMixin, PipelineTesterMixin, unittest.TestCase):
    all_model_classes = (M2D2AudioModel, M2D2ForAudioClassification)
    pipeline_model_mapping = {"audio-classification": M2D2ForAudioClassification, "feature-extraction": M2D2AudioModel}
    # The input is a log-mel, projected to patches by a Conv2d: there is no token embedding matrix to resize.
    test_resize_embeddings = False
    # The positional table is the fixed sin-cos table of one chunk's patch grid (set by chunk_frames and the mel
    # bins; longer inputs are chunked), not sized by a max_position_embeddings setting: the mixin's resize test does
    # not apply (`resize_position_embeddings(chunk_frames)` is tested in tests/test_old_folders.py).
    test_resize_position_embeddings = False

    def setUp(self):
        self.model_tester = M2D2AudioModelTester(self)
        self.config_tester = ConfigTester(self, config_class=M2D2AudioConfig, has_text_modality=False, hidden_size=48)

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="an audio encoder of log-mel patches has no inputs_embeds argument (as AST)")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="an audio encoder of log-mel patches has no inputs_embeds argument (as AST)")
    def test_inputs_embeds_matches_input_ids(self):
        pass

    def test_hidden_states_output(self):
        # Overridden as AST and CLAP's audio tests override theirs: the hidden states are per-clip patch tokens in the
        # layout of `last_hidden_state` (no CLS token), while the attention maps include CLS; the same checks run
        # with the tokens' length.
        self.model_tester.encoder_seq_length = self.model_tester.seq_length
        super().test_hidden_states_output()

    def test_model_get_set_embeddings(self):
        # As AST: the input embedding is the patch projection (a Conv2d module, no nn.Embedding); no output embedding.
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
            self.assertIsNone(model.get_output_embeddings())


class M2D2ClapModelTester:
    """A tiny random M2D2ClapModel: the tiny audio tower above and a 2-layer BERT text tower."""

    def __init__(self, parent, batch_size=3):
        self.parent = parent
        self.audio_model_tester = M2D2AudioModelTester(parent, batch_size=batch_size)
        self.batch_size = batch_size
        self.text_seq_length = 7
        self.vocab_size = 99
        self.is_training = True
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4

    def get_config(self) -> M2D2Config:
        text_config = BertConfig(
            vocab_size=self.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=64,
        )
        return M2D2Config(
            audio_config=self.audio_model_tester.get_config().to_dict(),
            text_config=text_config.to_dict(),
            projection_dim=32,
            projector_intermediate_size=24,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.text_seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.text_seq_length])
        _, audio_inputs = self.audio_model_tester.prepare_config_and_inputs_for_common()
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **audio_inputs, "return_loss": True}
        return self.get_config(), inputs


class M2D2ClapModelTest(ModelTesterMixin, PipelineTesterMixin, unittest.TestCase):
    all_model_classes = (M2D2ClapModel,)
    # As transformers' CLAP test: no "zero-shot-audio-classification" entry, because the mixin cannot run that task
    # for any model: its task test (tests/pipelines/test_pipelines_zero_shot_audio_classification.py) has no
    # get_test_pipeline / run_pipeline_test ("Deactivating auto tests", there is no model mapping for the task).
    # The zero-shot pipeline is tested with M2D2ClapModel in tests/test_pipeline.py and test_pipeline_batching.py.
    pipeline_model_mapping = {"feature-extraction": M2D2ClapModel}
    additional_model_inputs = ["input_features", "input_features_mask"]
    # Audio and text sub-configs: the mixin's composite checks (attn_implementation per sub-config, SDPA dispatch
    # per tower) apply.
    _is_composite = True
    # Token embeddings belong to the text tower and are tested with it; the composite, as transformers' CLAP
    # tests, does not resize them.
    test_resize_embeddings = False
    # The hidden states and attentions of each tower are tested with that tower (as CLAP's composite test).
    test_attention_outputs = False

    def setUp(self):
        self.model_tester = M2D2ClapModelTester(self)
        self.config_tester = ConfigTester(self, config_class=M2D2Config, has_text_modality=False, common_properties=[])

    def test_config(self):
        self.config_tester.run_common_tests()

    @parameterized.expand(EAGER_MATCHES_SDPA_CASES)
    def test_eager_matches_sdpa_inference(
        self, name, dtype, padding_side, use_attention_mask, output_attentions, enable_kernels
    ):
        # The CLAP logits are cosines times exp(logit_scale) = 100: fp16's rounding of the embeddings (~5e-4)
        # becomes ~5e-2 in the logits, so fp16 gets that tolerance. fp32's absolute tolerance is the mixin's 1e-6
        # scaled the same way: eager and SDPA round the embeddings ~1e-7 apart, ~1e-5 in the logits, which the
        # mixin's 1e-6 failed for logits near zero in some random draws (a cosine of 1e-3 is a logit of 0.1).
        atols = {(device, kernels, torch.float16): 5e-2 for device in ("cpu", "cuda") for kernels in (False, True)}
        rtols = dict(atols)
        defaults = {torch.float32: (1e-6 * 100, 1e-4), torch.bfloat16: (1e-2, 1e-2)}
        for device in ("cpu", "cuda"):
            for kernels in (False, True):
                for precision, (atol, rtol) in defaults.items():
                    atols[(device, kernels, precision)] = atol
                    rtols[(device, kernels, precision)] = (
                        3e-2 if (device, kernels, precision) == ("cuda", True, torch.bfloat16) else rtol
                    )
        _modeling._test_eager_matches_sdpa_inference(
            self, name, dtype, padding_side, use_attention_mask, output_attentions, enable_kernels, atols, rtols
        )

    @unittest.skip(reason="hidden states are tested with each tower (as transformers' CLAP composite test)")
    def test_hidden_states_output(self):
        pass

    @unittest.skip(reason="inputs_embeds is tested with the text tower (as transformers' CLAP composite test)")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="inputs_embeds is tested with the text tower (as transformers' CLAP composite test)")
    def test_inputs_embeds_matches_input_ids(self):
        pass

    @unittest.skip(reason="retain_grad of hidden states is tested with each tower (as transformers' CLAP test)")
    def test_retain_grad_hidden_states_attentions(self):
        pass


class M2D2ForPreTrainingTester(M2D2AudioModelTester):
    def __init__(self, parent, batch_size=7, **kwargs):
        # 7 clips: the eager-vs-SDPA test batches 7 and would pad a smaller batch's masks with random, repeating
        # patch indices, which pre-training rightly rejects.
        super().__init__(parent, batch_size=batch_size, **kwargs)
        # The online encoder sees CLS + the 3 visible patches.
        self.seq_length = self.encoder_seq_length = self.key_length = 4

    def get_config(self) -> M2D2PreTrainingConfig:
        return M2D2PreTrainingConfig(
            **self.config_kwargs(),
            predictor_hidden_size=16,
            predictor_num_hidden_layers=1,
            predictor_num_attention_heads=2,
            predictor_intermediate_size=24,
        )

    def prepare_config_and_inputs_for_common(self):
        config, inputs = super().prepare_config_and_inputs_for_common()
        # A fixed mask: the common tests compare outputs of repeated calls, which a random mask would change.
        visible = torch.tensor([[0, 3, 5]] * self.batch_size)
        return config, {**inputs, "visible_indices": visible}


class M2D2ForPreTrainingTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (M2D2ForPreTraining,)
    # The fixed mask travels with the log-mel wherever the mixin builds its own inputs.
    additional_model_inputs = ["visible_indices"]
    # A training-only model: its random masks and their complements have data-dependent sizes. Exporting is for
    # inference (M2D2AudioModel, M2D2ForAudioClassification and M2D2ClapModel run the export test).
    test_torch_exportable = False
    # The same patch projection and sin-cos positional table as M2D2AudioModel (see M2D2AudioModelTest).
    test_resize_embeddings = False
    test_resize_position_embeddings = False

    def setUp(self):
        self.model_tester = M2D2ForPreTrainingTester(self)
        self.config_tester = ConfigTester(
            self, config_class=M2D2PreTrainingConfig, has_text_modality=False, hidden_size=48
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="an audio encoder of log-mel patches has no inputs_embeds argument (as AST)")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="an audio encoder of log-mel patches has no inputs_embeds argument (as AST)")
    def test_inputs_embeds_matches_input_ids(self):
        pass

    def test_model_get_set_embeddings(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        model = M2D2ForPreTraining(config)
        self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
        self.assertIsNone(model.get_output_embeddings())


class M2D2FeatureExtractionTester:
    """The sequence feature-extraction mixin's inputs, as Whisper's and CLAP's testers make them: its padding and
    truncation tests run the inherited `SequenceFeatureExtractor.pad` on time-major feature sequences
    `[frames, feature_size]` of growing lengths. The waveform front end (`__call__`) is tested in
    `M2D2FeatureExtractionTest` below."""

    def __init__(self, parent, batch_size=7, min_seq_length=40, max_seq_length=200, feature_size=8):
        self.parent = parent
        self.batch_size = batch_size
        self.min_seq_length = min_seq_length
        self.max_seq_length = max_seq_length
        self.seq_length_diff = (max_seq_length - min_seq_length) // (batch_size - 1)
        self.feature_size = feature_size
        self.rng = np.random.default_rng(0)

    def prepare_feat_extract_dict(self) -> dict:
        return {
            "feature_size": self.feature_size,
            "sampling_rate": 16000,
            "hop_length": 160,
            "norm_stats": [-7.5, 4.5],
            "min_frames": 4,
            "padding_value": 0.0,
            "return_attention_mask": True,
        }

    def prepare_inputs_for_common(self, equal_length=False, numpify=False):
        if equal_length:
            lengths = [self.max_seq_length] * self.batch_size
        else:
            lengths = range(self.min_seq_length, self.max_seq_length, self.seq_length_diff)
        inputs = [self.rng.random((length, self.feature_size)) for length in lengths]
        return inputs if numpify else [x.tolist() for x in inputs]


class M2D2FeatureExtractionTest(SequenceFeatureExtractionTestMixin, unittest.TestCase):
    feature_extraction_class = M2D2FeatureExtractor

    def setUp(self):
        self.feat_extract_tester = M2D2FeatureExtractionTester(self)

    def _extractor(self) -> M2D2FeatureExtractor:
        return self.feature_extraction_class(**self.feat_extract_dict)

    def test_call(self):
        # As AST's and CLAP's own tests: lists and arrays give the same features, one clip or a batch, and a 2-D
        # array is a batch of equal-length clips.
        extractor = self._extractor()
        rng = np.random.default_rng(1)
        clips = [rng.uniform(-1, 1, length) for length in (800, 1000, 1200)]
        single_list = extractor(clips[0].tolist(), sampling_rate=16000, return_tensors="np").input_features
        single_array = extractor(clips[0], sampling_rate=16000, return_tensors="np").input_features
        self.assertEqual(single_array.shape, (1, 8, 1 + 800 // 160))
        np.testing.assert_allclose(single_list, single_array, atol=1e-5)

        from_lists = extractor([c.tolist() for c in clips], sampling_rate=16000, return_tensors="np")
        from_arrays = extractor(clips, sampling_rate=16000, return_tensors="np")
        np.testing.assert_allclose(from_lists.input_features, from_arrays.input_features, atol=1e-5)
        self.assertEqual(from_arrays.input_features_mask.sum(-1).tolist(), [6, 7, 8])

        equal = [c[:800] for c in clips]
        np.testing.assert_allclose(
            extractor(np.stack(equal), sampling_rate=16000, return_tensors="np").input_features,
            extractor(equal, sampling_rate=16000, return_tensors="np").input_features,
            atol=1e-5,
        )

    def test_double_precision_pad(self):
        extractor = self._extractor()
        features = np.random.default_rng(2).random((100, 8))
        for inputs in (features.tolist(), features):
            as_numpy = extractor.pad([{"input_features": inputs}], return_tensors="np").input_features
            as_torch = extractor.pad([{"input_features": inputs}], return_tensors="pt").input_features
            self.assertEqual((as_numpy.dtype, as_torch.dtype), (np.float32, torch.float32))

    def test_double_precision_call(self):
        # float64 waveforms (librosa, scipy) give the float32 features of the same samples in float32.
        extractor = self._extractor()
        clip = np.random.default_rng(3).uniform(-1, 1, 1600)
        for return_tensors in ("np", "pt"):
            doubled = extractor(clip, sampling_rate=16000, return_tensors=return_tensors).input_features
            single = extractor(clip.astype(np.float32), sampling_rate=16000, return_tensors=return_tensors)
            self.assertEqual(str(doubled.dtype).rsplit(".")[-1], "float32")
            np.testing.assert_allclose(np.asarray(doubled), np.asarray(single.input_features), atol=1e-6)


class M2D2ProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    """transformers' processor contract for M2D2Processor (feature extractor + bert-base-uncased's WordPiece
    tokenizer, from the offline stand-in), as CLAP's processor is tested."""

    processor_class = M2D2Processor

    @classmethod
    def _setup_feature_extractor(cls) -> M2D2FeatureExtractor:
        return M2D2FeatureExtractor()

    @classmethod
    def _setup_tokenizer(cls):
        return AutoTokenizer.from_pretrained(str(minilm_dir()))
