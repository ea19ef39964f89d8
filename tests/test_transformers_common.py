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

import tempfile
import unittest

import numpy as np
import pytest
import torch
from parameterized import parameterized
from transformers import BertConfig

from m2d2_hf import (
    M2D2AudioConfig,
    M2D2AudioModel,
    M2D2ClapModel,
    M2D2Config,
    M2D2FeatureExtractor,
    M2D2ForAudioClassification,
    M2D2ForPreTraining,
    M2D2Processor,
)

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
SequenceFeatureExtractionTestMixin = _common["test_sequence_feature_extraction_common"].SequenceFeatureExtractionTestMixin
ProcessorTesterMixin = _common["test_processing_common"].ProcessorTesterMixin
PipelineTesterMixin = _common["test_pipeline_mixin"].PipelineTesterMixin
EAGER_MATCHES_SDPA_CASES = _modeling.TEST_EAGER_MATCHES_SDPA_INFERENCE_PARAMETERIZATION


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
        return M2D2AudioConfig(
            num_mel_bins=self.num_mel_bins,
            patch_size=self.patch_size,
            chunk_frames=16,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            predictor_hidden_size=16,
            predictor_num_hidden_layers=1,
            predictor_num_attention_heads=2,
            predictor_intermediate_size=24,
            num_labels=self.num_labels,
        )

    def prepare_config_and_inputs(self):
        input_features = floats_tensor([self.batch_size, self.num_mel_bins, self.frames])
        labels = ids_tensor([self.batch_size], self.num_labels)
        return self.get_config(), input_features, labels

    def prepare_config_and_inputs_for_common(self):
        config, input_features, _ = self.prepare_config_and_inputs()
        return config, {"input_features": input_features}


class M2D2AudioModelTest(ModelTesterMixin, PipelineTesterMixin, unittest.TestCase):
    all_model_classes = (M2D2AudioModel, M2D2ForAudioClassification)
    pipeline_model_mapping = {"audio-classification": M2D2ForAudioClassification, "feature-extraction": M2D2AudioModel}
    # The input is a log-mel, projected to patches by a Conv2d: there is no token embedding matrix to resize.
    test_resize_embeddings = False
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
    pipeline_model_mapping = {"zero-shot-audio-classification": M2D2ClapModel, "feature-extraction": M2D2ClapModel}
    additional_model_inputs = ["input_features", "input_features_mask"]
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
        # becomes ~5e-2 in the logits, so fp16 gets that tolerance; fp32 and bf16 keep the mixin's defaults.
        atols = {(device, kernels, torch.float16): 5e-2 for device in ("cpu", "cuda") for kernels in (False, True)}
        rtols = dict(atols)
        defaults = {torch.float32: (1e-6, 1e-4), torch.bfloat16: (1e-2, 1e-2)}
        for device in ("cpu", "cuda"):
            for kernels in (False, True):
                for precision, (atol, rtol) in defaults.items():
                    atols[(device, kernels, precision)] = atol
                    rtols[(device, kernels, precision)] = 3e-2 if (device, kernels, precision) == ("cuda", True, torch.bfloat16) else rtol
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
    test_resize_embeddings = False
    test_resize_position_embeddings = False

    def setUp(self):
        self.model_tester = M2D2ForPreTrainingTester(self)

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
