#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "core/json.h"

namespace smp {
namespace json {
namespace {

TEST(Json, RoundTripsEveryType) {
  Value v = Value::object();
  v.set("null", Value());
  v.set("t", true);
  v.set("f", false);
  v.set("int", std::int64_t{-9007199254740993});
  v.set("big", std::int64_t{9223372036854775807});
  v.set("double", 0.1);
  v.set("whole_double", 3.0);
  v.set("str", "tab\there \"quoted\" back\\slash \x01 caf\xc3\xa9");
  Value arr = Value::array();
  arr.push_back(1);
  arr.push_back(Value::array());
  arr.push_back(Value::object());
  v.set("arr", arr);

  const std::string text = v.dump();
  const Value back = parse(text);
  EXPECT_EQ(back, v);
  EXPECT_EQ(back.at("int").as_int(), -9007199254740993LL);
  EXPECT_EQ(back.at("big").as_int(), 9223372036854775807LL);
  EXPECT_TRUE(back.at("whole_double").type() == Value::Type::kDouble);
  EXPECT_EQ(back.at("double").as_double(), 0.1);
  EXPECT_EQ(back.dump(), text);
  // Key order is kept.
  EXPECT_EQ(back.as_object().front().first, "null");
  EXPECT_EQ(back.as_object().back().first, "arr");
}

TEST(Json, ParsesEscapesAndWhitespace) {
  const Value v = parse(" { \"a\" : [ 1 , -2.5e2 , \"\\u00e9\\ud83d\\ude00\\n\\/\" ] ,\n \"b\":null } ");
  const auto& a = v.at("a").as_array();
  ASSERT_EQ(a.size(), 3u);
  EXPECT_EQ(a[0].as_int(), 1);
  EXPECT_EQ(a[1].as_double(), -250.0);
  EXPECT_EQ(a[2].as_string(), "\xc3\xa9\xf0\x9f\x98\x80\n/");
  EXPECT_TRUE(v.at("b").is_null());
  EXPECT_EQ(v.find("missing"), nullptr);
}

TEST(Json, NonFiniteDoublesBecomeNull) {
  EXPECT_EQ(Value(std::nan("")).dump(), "null");
  EXPECT_EQ(Value(HUGE_VAL).dump(), "null");
}

TEST(Json, ErrorsSayWhereAndWhat) {
  auto message = [](const std::string& text) {
    try {
      parse(text);
    } catch (const JsonError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message("{\"a\": 1,\n \"b\" 2}").find("expected ':' at line 2 column 6"),
            std::string::npos)
      << message("{\"a\": 1,\n \"b\" 2}");
  EXPECT_NE(message("[1, 2").find("expected ',' or ']'"), std::string::npos);
  EXPECT_NE(message("\"abc").find("unterminated string"), std::string::npos);
  EXPECT_NE(message("[1] x").find("unexpected characters"), std::string::npos);
  EXPECT_NE(message("tru").find("unexpected character 't'"), std::string::npos);
  EXPECT_NE(message("\"\\ud800\"").find("surrogate"), std::string::npos);
  EXPECT_NE(message(std::string(600, '[')).find("nesting deeper than 512"), std::string::npos);

  const Value v = parse("{\"a\": \"s\"}");
  EXPECT_THROW(v.at("a").as_int(), JsonError);
  EXPECT_THROW(v.at("b"), JsonError);
  try {
    v.at("a").as_int();
  } catch (const JsonError& e) {
    EXPECT_NE(std::string(e.what()).find("expected a JSON integer, got string"), std::string::npos);
  }
}

}  // namespace
}  // namespace json
}  // namespace smp
