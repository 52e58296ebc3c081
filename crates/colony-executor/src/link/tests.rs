use super::*;

#[test]
fn only_the_unknown_executor_code_is_final() {
    let error = |code: pb::LinkErrorCode, message: &str| pb::LinkError {
        message: message.to_owned(),
        code: code.into(),
    };
    assert!(is_unknown_executor(&error(
        pb::LinkErrorCode::UnknownExecutor,
        "executor 7 is unknown to this cluster"
    )));
    // The words alone mean nothing: only the code is read.
    assert!(!is_unknown_executor(&error(pb::LinkErrorCode::Unspecified, "unknown executor 7")));
    assert!(!is_unknown_executor(&error(pb::LinkErrorCode::Rejected, "not the leader")));
}
