"""Test sentences: short, long (past the model's 256-token limit), non-ASCII, mixed."""

SHORT = [
    "Hello world",
    "The cat sat on the mat.",
    "A man is playing a guitar.",
    "Water boils at 100 degrees Celsius at sea level.",
    "How do I reset my password?",
    "Stock markets fell sharply on Tuesday.",
    "She sells sea shells by the sea shore.",
    "Quantum computers use qubits instead of bits.",
    "The Eiffel Tower is in Paris.",
    "I love pizza",
    "Deep learning models need a lot of data to train well.",
    "What is the meaning of life?",
    "Photosynthesis converts light energy into chemical energy.",
    "The meeting was moved to next Thursday afternoon.",
    "Cats",
    "A",
    "JAX compiles numerical programs with XLA.",
    "The train to Boston leaves at 6:45 pm from platform 3.",
    "Rain is expected throughout the weekend.",
    "He forgot his umbrella again!",
]
NON_ASCII = [
    "Ünïcödé text with àccents and ß",
    "日本語の文章をベクトルに変換します。",
    "Привет, как дела?",
    "Café au lait et croissant, s'il vous plaît.",
    "emoji: 🚀🔥✨ are fun 😊",
    "مرحبا بالعالم",
    "Ελληνικά γράμματα: αβγδε",
    "中文句子：今天天气很好。",
    "नमस्ते दुनिया",
    "Tiếng Việt có dấu thanh.",
]
_WORDS = (
    "retrieval ranking pipelines run embedding and cross encoder models next to their large "
    "language models and expect the same engine to serve both while users compare vectors "
    "against references on many different inputs of every length"
).split()
LONG = [" ".join(_WORDS[(i * 7 + j) % len(_WORDS)] for j in range(180 + 40 * i)) for i in range(8)]
MEDIUM = [" ".join(_WORDS[(i + j) % len(_WORDS)] for j in range(20 + 9 * i)) for i in range(14)]
ALL = SHORT + NON_ASCII + LONG + MEDIUM  # 52 sentences
# One batch mixing every kind, shuffled deterministically.
MIXED = [ALL[(i * 17) % len(ALL)] for i in range(len(ALL))]
