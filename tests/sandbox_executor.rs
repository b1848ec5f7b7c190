//! The sandbox executor driven through the executor traits: real sandboxes, no mocks.

mod sandbox_support;

use poseidon_lite::executor::Outcome;
use sandbox_support::*;

#[test]
fn true_exits_zero() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let runner = test.runner();
    let run = run(&*runner, "true");
    assert_eq!(run.outcome, Outcome::Exited(0), "{run:?}");
    runner.destroy();
}
