"""The HEAR 2021 API (hear-eval-kit's common interface) over an M2D2 model folder.

    import m2d2_hf.hear as hear
    model = hear.load_model("path/to/m2d2")                       # an M2D2AudioModel or M2D2ClapModel folder
    scene = hear.get_scene_embeddings(audio, model)               # audio: [n_sounds, n_samples] at 16 kHz
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)

Scene embeddings are the clip embeddings of EVAR's linear evaluation (the mean of the 3840-d frame features);
timestamp embeddings are the frames with their frequency bands averaged (768-d), as the original runtime's
`get_timestamp_embeddings`. Their timestamps follow the HEAR API: the centre of each frame at the encoder's real hop
(one frame per patch of 16 log-mel frames of 10 ms: frame i at (i + 0.5) * 160 ms, `centred_frame_timestamps`).
The original runtime instead spreads frame starts evenly over the clip (`m2d2_hf.frame_timestamps`, 161.29 ms apart
at 10 s, up to 159 ms early); that formula stays for parity with the original.
"""

import numpy as np
import torch
from torch import nn

from .feature_extraction_m2d2 import M2D2FeatureExtractor
from .modeling_m2d2 import M2D2AudioModel


class HearModel(nn.Module):
    """An M2D2 audio encoder with its feature extractor and the attributes the HEAR API requires."""

    def __init__(self, audio_model: M2D2AudioModel, feature_extractor: M2D2FeatureExtractor):
        super().__init__()
        self.audio_model = audio_model.eval()
        self.feature_extractor = feature_extractor
        self.sample_rate = feature_extractor.sampling_rate
        self.scene_embedding_size = audio_model.config.frame_feature_size
        self.timestamp_embedding_size = audio_model.config.hidden_size

    @torch.no_grad()
    def encode(self, audio: torch.Tensor):
        if audio.dim() != 2:
            raise ValueError(
                f"HEAR audio must be [n_sounds, n_samples] at {self.sample_rate} Hz, got {tuple(audio.shape)}"
            )
        device = next(self.audio_model.parameters()).device
        inputs = self.feature_extractor(audio.to(device), sampling_rate=self.sample_rate, return_tensors="pt")
        return self.audio_model(**inputs)


def load_model(model_file_path: str = "", device: str | None = None) -> HearModel:
    """Loads the audio encoder of an M2D2 folder (audio, CLAP, pre-training or classification) for HEAR."""
    if not model_file_path:
        raise ValueError("load_model needs the path of an M2D2 model folder (m2d2-hf convert makes one)")
    audio_model = M2D2AudioModel.from_pretrained(model_file_path)
    if device:
        audio_model.to(device)
    return HearModel(audio_model, M2D2FeatureExtractor.from_pretrained(model_file_path))


def centred_frame_timestamps(num_frames: int, frame_hop_ms: float) -> np.ndarray:
    """Times in ms of the centres of `num_frames` consecutive frames `frame_hop_ms` apart: (i + 0.5) * hop."""
    return ((np.arange(num_frames, dtype=np.float64) + 0.5) * frame_hop_ms).astype(np.float32)


def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """[n_sounds, scene_embedding_size]: the mean of each sound's frame features."""
    return model.encode(audio).pooler_output


def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel) -> tuple[torch.Tensor, torch.Tensor]:
    """([n_sounds, n_frames, timestamp_embedding_size], [n_sounds, n_frames] ms): per frame, the mean of its
    frequency-band tokens, and the centre of each frame in ms (sounds have equal lengths in HEAR)."""
    outputs = model.encode(audio)
    embeddings = model.audio_model.timestamp_embeddings(outputs)
    config = model.audio_model.config
    hop_ms = 1000.0 * config.patch_size[1] * model.feature_extractor.hop_length / model.sample_rate
    times = torch.from_numpy(centred_frame_timestamps(embeddings.shape[1], hop_ms))
    return embeddings, times.to(embeddings.device).expand(audio.shape[0], -1)
