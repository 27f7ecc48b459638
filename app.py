"""`python app.py` serves the voice chat page: the app file of Hugging Face Spaces (README's front matter) and of
a checkout. The app itself is blsp_chat/app.py, so that an installed package runs it too, as `blsp-chat app`."""
from blsp_chat.app import main

if __name__ == "__main__":
    main()
