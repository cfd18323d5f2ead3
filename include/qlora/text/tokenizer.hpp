#pragma once
// The tokenizers: ByteTokenizer (raw bytes) and BpeTokenizer (byte-level BPE from a Hugging Face
// tokenizer.json). Include this for both.
#include "qlora/text/bpe_tokenizer.hpp"
#include "qlora/text/byte_tokenizer.hpp"
