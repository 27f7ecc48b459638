"""Talking with the model by voice, offline: end-of-turn detection (`vad`) and spoken replies (`tts`,
`speaker`). Pure logic over numpy arrays; sounddevice and Gradio stay in mic.py and ui.py."""
