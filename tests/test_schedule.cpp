// lr schedules against transformers' formulas, evaluated by hand at chosen steps.
#include <catch2/catch.hpp>
#include <cmath>

#include "qlora/optim/schedule.hpp"

using qlora::optim::Schedule;
using qlora::optim::ScheduleKind;

namespace {
Schedule make(ScheduleKind kind, std::int64_t warmup, std::int64_t total, double min_ratio = 0.0) {
  Schedule s;
  s.kind = kind;
  s.warmup_steps = warmup;
  s.total_steps = total;
  s.min_lr_ratio = min_ratio;
  s.validate();
  return s;
}
}  // namespace

TEST_CASE("warmup rises linearly from 0 for every kind") {
  for (ScheduleKind k : {ScheduleKind::Constant, ScheduleKind::Linear, ScheduleKind::Cosine}) {
    const Schedule s = make(k, 10, 110);
    CHECK(s.factor(0) == 0.0);  // the first optimizer step runs at lr 0, as under the Trainer
    CHECK(s.factor(1) == 0.1);
    CHECK(s.factor(5) == 0.5);
    CHECK(s.factor(9) == 0.9);
    CHECK(s.factor(10) == 1.0);  // warmup ends at the peak
  }
}

TEST_CASE("cosine: 0.5 * (1 + cos(pi * (s - warmup) / (total - warmup)))") {
  const Schedule s = make(ScheduleKind::Cosine, 10, 110);
  CHECK(s.factor(35) == Approx(0.8535533905932737).epsilon(1e-15));   // progress 1/4: (1 + sqrt(1/2)) / 2
  CHECK(s.factor(60) == Approx(0.5).epsilon(1e-15));                  // progress 1/2
  CHECK(s.factor(85) == Approx(0.14644660940672627).epsilon(1e-14));  // progress 3/4
  CHECK(s.factor(110) == 0.0);                                        // cos(math.pi) rounds to exactly -1
  CHECK(s.factor(160) == Approx(0.5).epsilon(1e-15));  // past total it rises again, as transformers'

  const Schedule no_warmup = make(ScheduleKind::Cosine, 0, 4);
  CHECK(no_warmup.factor(0) == 1.0);
  CHECK(no_warmup.factor(2) == Approx(0.5).epsilon(1e-15));
}

TEST_CASE("linear: max(0, (total - s) / (total - warmup))") {
  const Schedule s = make(ScheduleKind::Linear, 4, 20);
  CHECK(s.factor(2) == 0.5);
  CHECK(s.factor(4) == 1.0);
  CHECK(s.factor(12) == 0.5);
  CHECK(s.factor(16) == 0.25);
  CHECK(s.factor(20) == 0.0);
  CHECK(s.factor(25) == 0.0);  // clamped at 0 past the end
}

TEST_CASE("constant: 1 after warmup, whatever total_steps is") {
  const Schedule s = make(ScheduleKind::Constant, 3, 0);
  CHECK(s.factor(1) == 1.0 / 3.0);
  CHECK(s.factor(3) == 1.0);
  CHECK(s.factor(1000000) == 1.0);
  CHECK(make(ScheduleKind::Constant, 0, 0).factor(0) == 1.0);
}

TEST_CASE("min_lr_ratio: factor * (1 - r) + r, warmup untouched") {
  const Schedule cos = make(ScheduleKind::Cosine, 10, 110, 0.1);
  CHECK(cos.factor(5) == 0.5);
  CHECK(cos.factor(10) == Approx(1.0).epsilon(1e-15));
  CHECK(cos.factor(60) == Approx(0.55).epsilon(1e-15));  // 0.5 * 0.9 + 0.1
  CHECK(cos.factor(110) == Approx(0.1).epsilon(1e-15));  // ends at the floor

  const Schedule lin = make(ScheduleKind::Linear, 4, 20, 0.2);
  CHECK(lin.factor(12) == Approx(0.6).epsilon(1e-15));  // 0.5 * 0.8 + 0.2
  CHECK(lin.factor(20) == Approx(0.2).epsilon(1e-15));
  CHECK(lin.factor(40) == Approx(0.2).epsilon(1e-15));  // linear's 0 clamp happens before the floor

  CHECK(make(ScheduleKind::Constant, 0, 0, 0.5).factor(7) == 1.0);  // nothing decays
}

TEST_CASE("schedule settings are validated") {
  Schedule s;
  s.kind = ScheduleKind::Cosine;
  s.total_steps = 0;
  CHECK_THROWS_WITH(s.validate(), Catch::Contains("total_steps") && Catch::Contains("got 0"));
  s.total_steps = 5;
  s.warmup_steps = 6;
  CHECK_THROWS_WITH(s.validate(), Catch::Contains(">= warmup_steps (6)"));
  s.warmup_steps = -1;
  CHECK_THROWS_WITH(s.validate(), Catch::Contains("warmup_steps is -1"));
  s.warmup_steps = 0;
  s.min_lr_ratio = 1.5;
  CHECK_THROWS_WITH(s.validate(), Catch::Contains("min_lr_ratio is 1.5"));
  CHECK_THROWS_WITH(qlora::optim::schedule_from_name("cosine_with_restarts"),
                    Catch::Contains("'cosine_with_restarts' is unknown"));
  CHECK(qlora::optim::schedule_from_name("linear") == ScheduleKind::Linear);
}
