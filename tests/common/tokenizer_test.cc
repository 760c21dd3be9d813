#include "common/tokenizer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "common/gguf.h"
#include "common/sentencepiece_model.h"
#include "common/spm_vocab.h"
#include "nlohmann/json.hpp"

namespace moe {
namespace {

// Reference produced by transformers 4.57.6's slow LlamaTokenizer (legacy=True, sentencepiece
// 0.2.3) on tokenizer.model; see the README in that directory.
constexpr char kTokenizerDir[] = "tests/testdata/tokenizer";
constexpr char kReplacement[] = "\xEF\xBF\xBD";  // U+FFFD
constexpr char kSpaceSymbol[] = "\xE2\x96\x81";  // "▁", SentencePiece's word boundary

struct Case {
  std::string text;
  std::vector<int32_t> ids;
  std::string decoded;
};

std::string ReadFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void WriteFile(const std::filesystem::path& path, const std::string& contents) {
  std::ofstream(path, std::ios::binary) << contents;
}

std::vector<Case> LoadCases() {
  const nlohmann::json cases =
      nlohmann::json::parse(ReadFile(std::filesystem::path(kTokenizerDir) / "cases.json"));
  std::vector<Case> result;
  for (const auto& c : cases) {
    result.push_back({c.at("text").get<std::string>(), c.at("ids").get<std::vector<int32_t>>(),
                      c.at("decoded").get<std::string>()});
  }
  return result;
}

// Strict UTF-8 (RFC 3629): shortest form, no surrogates, at most U+10FFFF, nothing truncated.
bool IsValidUtf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const auto b0 = static_cast<unsigned char>(s[i]);
    size_t length = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (b0 < 0x80) {
      length = 1;
    } else if (b0 >= 0xC2 && b0 <= 0xDF) {
      length = 2;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
      length = 3;
      lo = b0 == 0xE0 ? 0xA0 : 0x80;
      hi = b0 == 0xED ? 0x9F : 0xBF;
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
      length = 4;
      lo = b0 == 0xF0 ? 0x90 : 0x80;
      hi = b0 == 0xF4 ? 0x8F : 0xBF;
    } else {
      return false;
    }
    if (i + length > s.size()) return false;
    for (size_t k = 1; k < length; ++k) {
      const auto b = static_cast<unsigned char>(s[i + k]);
      if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) return false;
    }
    i += length;
  }
  return true;
}

class TokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto tokenizer = Tokenizer::Load(kTokenizerDir);
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = std::move(tokenizer).value().release();
    std::string error;
    model_ = SentencePieceModel::FromSerialized(
                 ReadFile(std::filesystem::path(kTokenizerDir) / "tokenizer.model"), &error)
                 .release();
    ASSERT_NE(model_, nullptr) << error;
  }
  void SetUp() override {
    ASSERT_NE(tokenizer_, nullptr);
    ASSERT_NE(model_, nullptr);
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    delete model_;
  }

  static int32_t Id(const std::string& piece) {
    const int id = model_->PieceToId(piece);
    EXPECT_NE(id, model_->unk_id()) << piece << " is not in the test vocabulary";
    return id;
  }

  // Feeds `ids` one at a time; returns the deltas, Finish()'s last.
  static std::vector<std::string> Stream(const std::vector<int32_t>& ids) {
    IncrementalDetokenizer detokenizer(tokenizer_);
    std::vector<std::string> deltas;
    for (const int32_t id : ids) deltas.push_back(detokenizer.Add(id));
    deltas.push_back(detokenizer.Finish());
    return deltas;
  }

  static std::string Join(const std::vector<std::string>& parts) {
    std::string joined;
    for (const auto& part : parts) joined += part;
    return joined;
  }

  static Tokenizer* tokenizer_;
  static SentencePieceModel* model_;
};

Tokenizer* TokenizerTest::tokenizer_ = nullptr;
SentencePieceModel* TokenizerTest::model_ = nullptr;

TEST_F(TokenizerTest, ModelProperties) {
  EXPECT_EQ(tokenizer_->vocab_size(), 1000);
  EXPECT_EQ(tokenizer_->bos_id(), 1);
  EXPECT_EQ(tokenizer_->eos_ids(), std::vector<int32_t>{2});
  EXPECT_TRUE(tokenizer_->IsEos(2));
  EXPECT_FALSE(tokenizer_->IsEos(1));
  EXPECT_TRUE(tokenizer_->legacy());  // tokenizer_config.json: "legacy": true
}

TEST_F(TokenizerTest, EncodeMatchesTransformers) {
  const std::vector<Case> cases = LoadCases();
  ASSERT_GE(cases.size(), 50u);
  for (const Case& c : cases) {
    EXPECT_EQ(tokenizer_->Encode(c.text), c.ids) << "text: \"" << c.text << "\"";
  }
}

TEST_F(TokenizerTest, EncodeWithoutBos) {
  const std::vector<int32_t> with_bos = tokenizer_->Encode("hello");
  ASSERT_FALSE(with_bos.empty());
  EXPECT_EQ(with_bos.front(), 1);
  EXPECT_EQ(tokenizer_->Encode("hello", /*add_bos=*/false),
            std::vector<int32_t>(with_bos.begin() + 1, with_bos.end()));
  EXPECT_TRUE(tokenizer_->Encode("", /*add_bos=*/false).empty());
}

TEST_F(TokenizerTest, DecodeMatchesTransformers) {
  for (const Case& c : LoadCases()) {
    EXPECT_EQ(tokenizer_->Decode(c.ids), c.decoded) << "text: \"" << c.text << "\"";
  }
}

// Expectations from transformers 4.57.6 (legacy=True) decode(ids, skip_special_tokens=True) on
// hand-made id sequences.
TEST_F(TokenizerTest, DecodeEdgeCasesMatchTransformers) {
  const int32_t f0 = Id("<0xF0>"), x9f = Id("<0x9F>"), x99 = Id("<0x99>"), x82 = Id("<0x82>");
  const int32_t space = Id(kSpaceSymbol);
  const int32_t the = Id(std::string(kSpaceSymbol) + "the");
  const int32_t a = Id("a");
  auto decode = [](const std::vector<int32_t>& ids) { return tokenizer_->Decode(ids); };
  const std::string r = kReplacement;
  // A character split by a non-byte token: each stray byte is one U+FFFD, as in SentencePiece
  // (not one per maximal invalid subsequence, as Python's errors="replace" would give).
  EXPECT_EQ(decode({a, f0, x9f, the, x99, x82}), "a" + r + r + " the" + r + r);
  // Overlong "/" (2 bytes), a surrogate (3 bytes), then a valid encoding of U+FFFD itself.
  EXPECT_EQ(decode({Id("<0xC0>"), Id("<0xAF>"), Id("<0xED>"), Id("<0xA0>"), Id("<0x80>"),
                    Id("<0xEF>"), Id("<0xBF>"), Id("<0xBD>")}),
            r + r + r + r + r + r);
  EXPECT_EQ(decode({f0, x9f, x99, x82, the}), "\xF0\x9F\x99\x82 the");
  // Special tokens are skipped wherever they are; the first remaining token loses its "▁", and
  // with legacy=True SentencePiece then strips one more when that token was a lone "▁".
  EXPECT_EQ(decode({1, the, 2, the, 0}), "the the");
  EXPECT_EQ(decode({1, space, the}), "the");
  EXPECT_EQ(decode({space, space, the}), " the");
  // Out-of-range ids are skipped (transformers would raise).
  EXPECT_EQ(decode({-1, the, 1000}), "the");
  EXPECT_EQ(decode({}), "");
}

TEST_F(TokenizerTest, IncrementalDeltasConcatenateToDecode) {
  for (const Case& c : LoadCases()) {
    // Generated ids carry no BOS; feed the prompt ids without it and with it.
    for (const size_t skip : {size_t{0}, size_t{1}}) {
      const std::vector<int32_t> ids(c.ids.begin() + std::min(skip, c.ids.size()), c.ids.end());
      const std::vector<std::string> deltas = Stream(ids);
      for (const std::string& delta : deltas) {
        EXPECT_TRUE(IsValidUtf8(delta)) << "text: \"" << c.text << "\"";
      }
      EXPECT_EQ(Join(deltas), tokenizer_->Decode(ids)) << "text: \"" << c.text << "\"";
      EXPECT_EQ(Join(deltas), c.decoded) << "text: \"" << c.text << "\"";
    }
  }
}

TEST_F(TokenizerTest, IncrementalHoldsBackEmojiSplitOverByteTokens) {
  const std::vector<int32_t> ids = tokenizer_->Encode("the \xF0\x9F\x99\x82 the", false);
  // "▁the ▁ <0xF0> <0x9F> <0x99> <0x82> ▁the"
  const auto first_byte = std::find(ids.begin(), ids.end(), Id("<0xF0>"));
  ASSERT_NE(first_byte, ids.end());
  const size_t i = first_byte - ids.begin();
  ASSERT_LE(i + 4, ids.size());
  ASSERT_EQ(ids[i + 3], Id("<0x82>"));

  const std::vector<std::string> deltas = Stream(ids);
  EXPECT_EQ(deltas[0], "the");  // the first token's "▁" is not shown
  EXPECT_EQ(deltas[i - 1], " ");
  EXPECT_EQ(deltas[i], "");
  EXPECT_EQ(deltas[i + 1], "");
  EXPECT_EQ(deltas[i + 2], "");
  EXPECT_EQ(deltas[i + 3], "\xF0\x9F\x99\x82");
  EXPECT_EQ(deltas[i + 4], " the");
  EXPECT_EQ(deltas.back(), "");
}

TEST_F(TokenizerTest, IncrementalFlushesIncompleteCharacterAsReplacement) {
  const int32_t f0 = Id("<0xF0>"), x9f = Id("<0x9F>"), the = Id(std::string(kSpaceSymbol) + "the");
  {
    IncrementalDetokenizer detokenizer(tokenizer_);
    EXPECT_EQ(detokenizer.Add(the), "the");
    EXPECT_EQ(detokenizer.Add(f0), "");
    EXPECT_EQ(detokenizer.Add(x9f), "");
    EXPECT_EQ(detokenizer.Finish(), std::string(kReplacement) + kReplacement);
  }
  {
    // The byte run ends at a non-byte token: the stray bytes come out with it.
    IncrementalDetokenizer detokenizer(tokenizer_);
    EXPECT_EQ(detokenizer.Add(f0), "");
    EXPECT_EQ(detokenizer.Add(x9f), "");
    EXPECT_EQ(detokenizer.Add(the), std::string(kReplacement) + kReplacement + " the");
    EXPECT_EQ(detokenizer.Finish(), "");
  }
  {
    // A byte that can start no character is emitted at once.
    IncrementalDetokenizer detokenizer(tokenizer_);
    EXPECT_EQ(detokenizer.Add(Id("<0xFF>")), kReplacement);
    EXPECT_EQ(detokenizer.Add(Id("<0x41>")), "A");
  }
}

TEST_F(TokenizerTest, IncrementalSkipsSpecialTokens) {
  const int32_t the = Id(std::string(kSpaceSymbol) + "the");
  IncrementalDetokenizer detokenizer(tokenizer_);
  EXPECT_EQ(detokenizer.Add(1), "");
  EXPECT_EQ(detokenizer.Add(the), "the");
  EXPECT_EQ(detokenizer.Add(the), " the");
  EXPECT_EQ(detokenizer.Add(2), "");
  EXPECT_EQ(detokenizer.Finish(), "");
}

// --- Loading --------------------------------------------------------------------------------

class TokenizerLoadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(::testing::TempDir()) /
           (std::string("tokenizer_load_test_") +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  void CopyModel() {
    std::filesystem::copy_file(std::filesystem::path(kTokenizerDir) / "tokenizer.model",
                               dir_ / "tokenizer.model");
  }

  std::filesystem::path dir_;
};

TEST_F(TokenizerLoadTest, MissingModelIsNotFound) {
  const auto tokenizer = Tokenizer::Load(dir_.string());
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(tokenizer.status().message().find((dir_ / "tokenizer.model").string()),
            std::string::npos)
      << tokenizer.status();
}

TEST_F(TokenizerLoadTest, CorruptModelIsInvalidArgument) {
  const std::string model = ReadFile(std::filesystem::path(kTokenizerDir) / "tokenizer.model");
  for (const std::string& contents :
       {std::string("this is not a sentencepiece model\n"), std::string(),
        model.substr(0, model.size() / 2), std::string(64, '\xFF')}) {
    WriteFile(dir_ / "tokenizer.model", contents);
    const auto tokenizer = Tokenizer::Load(dir_.string());
    ASSERT_FALSE(tokenizer.ok()) << "contents size " << contents.size();
    EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(tokenizer.status().message().find("tokenizer.model"), std::string::npos);
  }
}

TEST_F(TokenizerLoadTest, SpecialIdsFallBackToTheModel) {
  CopyModel();
  const auto tokenizer = Tokenizer::Load(dir_.string());
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ((*tokenizer)->bos_id(), 1);
  EXPECT_EQ((*tokenizer)->eos_ids(), std::vector<int32_t>{2});
  EXPECT_TRUE((*tokenizer)->legacy());  // no tokenizer_config.json: transformers' default
}

TEST_F(TokenizerLoadTest, SpecialIdsFromConfigJson) {
  CopyModel();
  WriteFile(dir_ / "config.json", R"({"bos_token_id": 5, "eos_token_id": 7, "vocab_size": 1000})");
  const auto tokenizer = Tokenizer::Load(dir_.string());
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ((*tokenizer)->bos_id(), 5);
  EXPECT_EQ((*tokenizer)->eos_ids(), std::vector<int32_t>{7});
  EXPECT_EQ((*tokenizer)->Encode("the").front(), 5);
  EXPECT_TRUE((*tokenizer)->IsEos(7));
  EXPECT_FALSE((*tokenizer)->IsEos(2));
}

TEST_F(TokenizerLoadTest, GenerationConfigWinsAndEosMayBeAList) {
  CopyModel();
  WriteFile(dir_ / "config.json", R"({"bos_token_id": 5, "eos_token_id": 7})");
  WriteFile(dir_ / "generation_config.json", R"({"eos_token_id": [2, 9], "bos_token_id": null})");
  const auto tokenizer = Tokenizer::Load(dir_.string());
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ((*tokenizer)->bos_id(), 5);  // absent (null) in generation_config.json
  EXPECT_EQ((*tokenizer)->eos_ids(), (std::vector<int32_t>{2, 9}));
  EXPECT_TRUE((*tokenizer)->IsEos(2));
  EXPECT_TRUE((*tokenizer)->IsEos(9));
  EXPECT_FALSE((*tokenizer)->IsEos(7));
}

TEST_F(TokenizerLoadTest, MalformedJsonNamesTheFile) {
  CopyModel();
  WriteFile(dir_ / "generation_config.json", R"({"eos_token_id": [2, )");
  const auto tokenizer = Tokenizer::Load(dir_.string());
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(tokenizer.status().message().find("generation_config.json"), std::string::npos)
      << tokenizer.status();
}

TEST_F(TokenizerLoadTest, BadTokenIdsAreInvalidArgument) {
  CopyModel();
  for (const char* config :
       {R"({"eos_token_id": 1000})", R"({"eos_token_id": [2, "x"]})", R"({"bos_token_id": -1})",
        R"({"eos_token_id": []})", R"({"bos_token_id": [1]})"}) {
    WriteFile(dir_ / "config.json", config);
    const auto tokenizer = Tokenizer::Load(dir_.string());
    ASSERT_FALSE(tokenizer.ok()) << config;
    EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument) << config;
    EXPECT_NE(tokenizer.status().message().find("config.json"), std::string::npos)
        << tokenizer.status();
  }
}

// legacy=False (tokenizer_config.json). Expectations from transformers 4.57.6's slow
// LlamaTokenizer(legacy=False) on the same tokenizer.model.
TEST_F(TokenizerLoadTest, NonLegacyMatchesTransformers) {
  CopyModel();
  WriteFile(dir_ / "tokenizer_config.json", R"({"legacy": false, "add_bos_token": true})");
  const auto loaded = Tokenizer::Load(dir_.string());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const Tokenizer& tokenizer = **loaded;
  EXPECT_FALSE(tokenizer.legacy());
  const std::vector<Case> cases = {
      {" ", {1, 924, 924}, " "},
      {"  hello", {1, 924, 924, 298, 291, 927}, "  hello"},
      {" leading and trailing ",
       {1, 924, 583, 341, 285, 271, 666, 879, 285, 924},
       " leading and trailing "},
      // No dummy prefix after a special token unless the text has a space there.
      {"text with <s> inside and </s> too",
       {1, 259, 925, 963, 926, 350, 924, 1, 295, 932, 576, 271, 924, 2, 277, 927},
       "text with  inside and  too"},
      {"</s> x", {1, 2, 924, 963}, "x"},
      // The "▁" before a leading special token is dropped.
      {"<s>hello", {1, 1, 260, 291, 927}, "hello"},
      {std::string(kSpaceSymbol) + "already" + kSpaceSymbol + "has" + kSpaceSymbol + "underline",
       {1, 924, 471, 266, 789, 443, 309, 748, 935, 887},
       " already has underline"},
      {"hello", {1, 298, 291, 927}, "hello"},
      {"", {1}, ""},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(tokenizer.Encode(c.text), c.ids) << "text: \"" << c.text << "\"";
    EXPECT_EQ(tokenizer.Decode(c.ids), c.decoded) << "text: \"" << c.text << "\"";
    IncrementalDetokenizer detokenizer(&tokenizer);
    std::string streamed;
    for (const int32_t id : c.ids) streamed += detokenizer.Add(id);
    streamed += detokenizer.Finish();
    EXPECT_EQ(streamed, c.decoded) << "text: \"" << c.text << "\"";
  }
}

TEST_F(TokenizerLoadTest, NonBoolLegacyIsInvalidArgument) {
  CopyModel();
  WriteFile(dir_ / "tokenizer_config.json", R"({"legacy": "no"})");
  const auto tokenizer = Tokenizer::Load(dir_.string());
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(tokenizer.status().message().find("tokenizer_config.json"), std::string::npos);
}

}  // namespace
}  // namespace moe

namespace moe {
namespace {

// A continuation keeps the first token's leading space: prompt + deltas reads like
// Decode(prompt + generated).
TEST(IncrementalDetokenizerContinuationTest, KeepsLeadingSpaceOfFirstToken) {
  auto tok = Tokenizer::Load("tests/testdata/tokenizer");
  ASSERT_TRUE(tok.ok()) << tok.status();
  const std::vector<int32_t> prompt = (*tok)->Encode("We hold these");
  const std::vector<int32_t> all = (*tok)->Encode("We hold these truths to be self-evident");
  ASSERT_TRUE(std::equal(prompt.begin(), prompt.end(), all.begin()));
  IncrementalDetokenizer plain(tok->get());
  IncrementalDetokenizer cont(tok->get(), /*continuation=*/true);
  std::string plain_text, cont_text;
  for (size_t i = prompt.size(); i < all.size(); ++i) {
    plain_text += plain.Add(all[i]);
    cont_text += cont.Add(all[i]);
  }
  plain_text += plain.Finish();
  cont_text += cont.Finish();
  EXPECT_EQ(plain_text, "truths to be self-evident");
  EXPECT_EQ(cont_text, " truths to be self-evident");
  EXPECT_EQ((*tok)->Decode(prompt) + cont_text, (*tok)->Decode(all));
}

}  // namespace
}  // namespace moe

namespace moe {
namespace {

// The tokenizer rebuilt from a GGUF file's vocabulary (llama.cpp's converter wrote the pieces,
// scores and types of tests/testdata/tokenizer/tokenizer.model) gives transformers' ids and
// text on every case, and libsentencepiece's ids on the whole corpus and on hostile strings.
class GgufTokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto file = GgufFile::Open("tests/testdata/gguf/llama_dense/llama_dense-f16.gguf");
    ASSERT_TRUE(file.ok()) << file.status();
    auto gguf = Tokenizer::FromGguf(**file);
    ASSERT_TRUE(gguf.ok()) << gguf.status();
    gguf_ = gguf->release();
    auto sp = Tokenizer::Load(kTokenizerDir);
    ASSERT_TRUE(sp.ok()) << sp.status();
    sp_ = sp->release();
  }
  static void TearDownTestSuite() {
    delete gguf_;
    delete sp_;
  }
  static Tokenizer* gguf_;
  static Tokenizer* sp_;
};
Tokenizer* GgufTokenizerTest::gguf_ = nullptr;
Tokenizer* GgufTokenizerTest::sp_ = nullptr;

TEST_F(GgufTokenizerTest, MatchesTransformersOnEveryCase) {
  EXPECT_EQ(gguf_->vocab_size(), 1000);
  EXPECT_EQ(gguf_->bos_id(), 1);
  EXPECT_EQ(gguf_->eos_ids(), std::vector<int32_t>{2});
  const std::vector<Case> cases = LoadCases();
  ASSERT_GE(cases.size(), 60u);
  for (const Case& c : cases) {
    EXPECT_EQ(gguf_->Encode(c.text), c.ids) << "text: \"" << c.text << "\"";
    EXPECT_EQ(gguf_->Decode(c.ids), c.decoded) << "text: \"" << c.text << "\"";
  }
}

TEST_F(GgufTokenizerTest, MatchesSentencePieceOnTheCorpusAndHostileStrings) {
  std::vector<std::string> texts;
  std::istringstream corpus(ReadFile(std::filesystem::path(kTokenizerDir) / "corpus.txt"));
  for (std::string line; std::getline(corpus, line);) texts.push_back(line);
  const std::string all = ReadFile(std::filesystem::path(kTokenizerDir) / "corpus.txt");
  texts.push_back(all);  // one long text: many merges in one agenda
  texts.push_back("\xff\xfe invalid \xc3 bytes \xe2\x82");
  texts.push_back("  leading,  double   spaces and trailing  ");
  texts.push_back(
      "\xe2\x96\x81"
      "already"
      "\xe2\x96\x81"
      "escaped <s> </s> <unk> <0x41>");
  texts.push_back("日本語 emoji 🦊🍇 Ελληνικά кириллица 12345678 3.14159");
  uint32_t seed = 12345;
  for (int i = 0; i < 200; ++i) {  // random mixtures of corpus slices and bytes
    std::string t;
    for (int k = 0; k < 8; ++k) {
      seed = seed * 1664525u + 1013904223u;
      if (seed % 5 == 0) {
        t.push_back(static_cast<char>(seed >> 24));
      } else {
        t.append(all.substr((seed >> 8) % (all.size() - 20), 1 + seed % 17));
      }
    }
    texts.push_back(t);
  }
  int compared = 0;
  for (const std::string& t : texts) {
    ASSERT_EQ(gguf_->Encode(t), sp_->Encode(t)) << "text: \"" << t << "\"";
    ++compared;
  }
  EXPECT_GE(compared, 250);
}

// User-defined pieces split the text whole, the longest at each position first; byte pieces may
// be written in either hex case; a character with neither a piece nor byte pieces is unk.
TEST(SpmVocabModelTest, UserDefinedPiecesLongestFirstAndByteFallback) {
  SpmVocab vocab;
  const auto add = [&](std::string piece, SpmVocab::Type type) {
    vocab.pieces.push_back(std::move(piece));
    vocab.scores.push_back(0.0f);
    vocab.types.push_back(type);
  };
  add("<unk>", SpmVocab::kUnknown);      // 0
  add("<s>", SpmVocab::kControl);        // 1
  add("</s>", SpmVocab::kControl);       // 2
  add(kSpaceSymbol, SpmVocab::kNormal);  // 3
  add("a", SpmVocab::kNormal);           // 4
  add("b", SpmVocab::kNormal);           // 5
  add("c", SpmVocab::kNormal);           // 6
  add("x", SpmVocab::kNormal);           // 7
  add("ab", SpmVocab::kUserDefined);     // 8
  add("abc", SpmVocab::kUserDefined);    // 9
  add("bc", SpmVocab::kUserDefined);     // 10
  add("<0x0a>", SpmVocab::kByte);        // 11: lowercase hex
  vocab.unk_id = 0;
  vocab.bos_id = 1;
  vocab.eos_id = 2;
  vocab.add_dummy_prefix = false;
  auto model = SpmVocabModel::Create(std::move(vocab), "test");
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->Encode("abcab\nbcx"), (std::vector<int>{9, 8, 11, 10, 7}));
  EXPECT_EQ((*model)->Encode("a b"), (std::vector<int>{4, 3, 5}));
  EXPECT_EQ((*model)->Encode("ab"), (std::vector<int>{8}));
  EXPECT_EQ((*model)->Encode("xa"), (std::vector<int>{7, 4}));
  EXPECT_EQ((*model)->Encode("\xC3\xA9"), (std::vector<int>{0}));  // "é": no piece, no bytes
}

}  // namespace
}  // namespace moe
