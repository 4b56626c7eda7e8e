"""The languages Whisper knows (transformers' WhisperTokenizer LANGUAGES and TO_LANGUAGE_CODE, copied
so that contract/ needs no transformers): `model.language` is one code or one name from here.
tests/test_config.py checks the copy against the installed transformers."""

CODES = frozenset({
    "af", "am", "ar", "as", "az", "ba", "be", "bg", "bn", "bo", "br", "bs", "ca", "cs", "cy", "da", "de",
    "el", "en", "es", "et", "eu", "fa", "fi", "fo", "fr", "gl", "gu", "ha", "haw", "he", "hi", "hr", "ht",
    "hu", "hy", "id", "is", "it", "ja", "jw", "ka", "kk", "km", "kn", "ko", "la", "lb", "ln", "lo", "lt",
    "lv", "mg", "mi", "mk", "ml", "mn", "mr", "ms", "mt", "my", "ne", "nl", "nn", "no", "oc", "pa", "pl",
    "ps", "pt", "ro", "ru", "sa", "sd", "si", "sk", "sl", "sn", "so", "sq", "sr", "su", "sv", "sw", "ta",
    "te", "tg", "th", "tk", "tl", "tr", "tt", "uk", "ur", "uz", "vi", "yi", "yo", "yue", "zh"
})

NAMES = frozenset({
    "afrikaans", "albanian", "amharic", "arabic", "armenian", "assamese", "azerbaijani", "bashkir",
    "basque", "belarusian", "bengali", "bosnian", "breton", "bulgarian", "burmese", "cantonese",
    "castilian", "catalan", "chinese", "croatian", "czech", "danish", "dutch", "english", "estonian",
    "faroese", "finnish", "flemish", "french", "galician", "georgian", "german", "greek", "gujarati",
    "haitian", "haitian creole", "hausa", "hawaiian", "hebrew", "hindi", "hungarian", "icelandic",
    "indonesian", "italian", "japanese", "javanese", "kannada", "kazakh", "khmer", "korean", "lao", "latin",
    "latvian", "letzeburgesch", "lingala", "lithuanian", "luxembourgish", "macedonian", "malagasy", "malay",
    "malayalam", "maltese", "mandarin", "maori", "marathi", "moldavian", "moldovan", "mongolian", "myanmar",
    "nepali", "norwegian", "nynorsk", "occitan", "panjabi", "pashto", "persian", "polish", "portuguese",
    "punjabi", "pushto", "romanian", "russian", "sanskrit", "serbian", "shona", "sindhi", "sinhala",
    "sinhalese", "slovak", "slovenian", "somali", "spanish", "sundanese", "swahili", "swedish", "tagalog",
    "tajik", "tamil", "tatar", "telugu", "thai", "tibetan", "turkish", "turkmen", "ukrainian", "urdu",
    "uzbek", "valencian", "vietnamese", "welsh", "yiddish", "yoruba"
})
