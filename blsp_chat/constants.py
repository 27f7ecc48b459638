"""Every fixed number and string of the project, with its derivation, in one place."""

# --- audio (Whisper's front end) -------------------------------------------------------------
SAMPLE_RATE = 16_000                      # Hz: Whisper's only input rate
CHUNK_LENGTH = 30                         # seconds: Whisper's receptive window
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE    # 480000 samples in one window
HOP_LENGTH = 160                          # samples between mel frames (10 ms)
N_FFT = 400                               # STFT window (25 ms)
N_FRAMES = N_SAMPLES // HOP_LENGTH        # 3000 mel frames in one window
ENCODER_STRIDE = 2                        # Whisper's second conv halves the frame rate
SAMPLES_PER_ENCODER_FRAME = HOP_LENGTH * ENCODER_STRIDE  # 320 samples = 20 ms

# --- prompt format of the released BLSP model (paper section 3; cwang621/blsp's release) -----------
# One conversation: BOS once, then `###[Human]:{instruction}{speech or transcript}\n\n\n###[Assistant]:{reply}`,
# each reply followed by `\n\n\n` before the next `###[Human]:`; no system prompt. Each text piece is
# tokenised on its own with BOS stripped (blsp_chat/prompt.py renders it).
HUMAN_PREFIX = "###[Human]:"
TURN_SEPARATOR = "\n\n\n"
ASSISTANT_PREFIX = "###[Assistant]:"
# The raw `###` format can run on into an invented next turn; generation stops on this too.
STOP_STRINGS = ("###",)
# openai/whisper's decoding temperatures: greedy first, then these for a reply that loops.
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)

# --- instructions (paper Table 1 and Table 11) ---------------------------------------------------
CONTINUATION_INSTRUCTION = (
    "Continue the following text in a coherent and engaging style with less than 40 words."
)
REPEAT_INSTRUCTION = "Please repeat the following words."
TRANSLATE_INSTRUCTION = "Please translate the following English text into {target} text."
SENTIMENT_INSTRUCTION = (
    "Please classify the emotional tone of the text as either positive, negative, or neutral."
)
INTENT_INSTRUCTION = "Please classify the intent of the text, choose from [{labels}]."

# --- weights ---------------------------------------------------------------------------------
CACHE_ENV_VAR = "BLSP_CHAT_CACHE"          # overrides the cache directory below
DEFAULT_CACHE_DIR = "~/.cache/blsp_chat"

# --- training --------------------------------------------------------------------------------
IGNORE_INDEX = -100                        # label value the loss skips (PyTorch's cross-entropy default)

# --- task presets: the instruction placed before a spoken turn (paper Tables 1 and 11) ----------
TASK_PRESETS = {
    "Chat": "",
    "Continue": CONTINUATION_INSTRUCTION,
    "Transcribe": REPEAT_INSTRUCTION,
    "Translate": TRANSLATE_INSTRUCTION,
    "Sentiment": SENTIMENT_INSTRUCTION,
    "Intent": INTENT_INSTRUCTION,
}
DEFAULT_TRANSLATION_TARGET = "German"
# SNIPS light-control intents (paper Table 11), the default label list of the intent preset.
SNIPS_LIGHT_INTENTS = ("DecreaseBrightness", "IncreaseBrightness", "SetLightBrightness",
                       "SetLightColor", "SwitchLightOff", "SwitchLightOn")
