//! ACL error codes, by name, and the error every failing call becomes.

use std::fmt;

/// A failed ACL call: which call, its code and name, and ACL's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclError {
    pub call: &'static str,
    pub code: i32,
    /// `aclGetRecentErrMsg()` right after the failure, or a note from Kiln.
    pub message: String,
}

impl AclError {
    /// An error Kiln detects before calling ACL (code -1).
    pub fn local(call: &'static str, message: String) -> AclError {
        AclError {
            call,
            code: -1,
            message,
        }
    }
}

impl fmt::Display for AclError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} failed with ACL error {} ({})",
            self.call,
            self.code,
            code_name(self.code)
        )?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message.trim())?;
        }
        Ok(())
    }
}

impl std::error::Error for AclError {}

/// The name of an ACL error code, as the ACL headers spell it.
pub fn code_name(code: i32) -> &'static str {
    match code {
        -1 => "checked by Kiln before calling ACL",
        0 => "ACL_SUCCESS",
        100000 => "ACL_ERROR_INVALID_PARAM",
        100001 => "ACL_ERROR_UNINITIALIZE",
        100002 => "ACL_ERROR_REPEAT_INITIALIZE",
        100003 => "ACL_ERROR_INVALID_FILE",
        100011 => "ACL_ERROR_INVALID_MODEL_ID",
        100012 => "ACL_ERROR_DESERIALIZE_MODEL",
        100013 => "ACL_ERROR_PARSE_MODEL",
        100014 => "ACL_ERROR_READ_MODEL_FAILURE",
        100017 => "ACL_ERROR_MODEL_INPUT_NOT_MATCH",
        100018 => "ACL_ERROR_MODEL_OUTPUT_NOT_MATCH",
        100019 => "ACL_ERROR_MODEL_NOT_DYNAMIC",
        100037 => "ACL_ERROR_REPEAT_FINALIZE",
        200000 => "ACL_ERROR_BAD_ALLOC",
        200001 => "ACL_ERROR_API_NOT_SUPPORT",
        200002 => "ACL_ERROR_INVALID_DEVICE",
        300000 => "ACL_ERROR_STORAGE_OVER_LIMIT",
        500000 => "ACL_ERROR_INTERNAL_ERROR",
        500001 => "ACL_ERROR_FAILURE",
        500002 => "ACL_ERROR_GE_FAILURE",
        500003 => "ACL_ERROR_RT_FAILURE",
        500004 => "ACL_ERROR_DRV_FAILURE",
        107000..=107999 | 207000..=207999 | 507000..=507999 => "a runtime (aclrt) error",
        145000..=145999 | 545000..=545999 => "a graph engine (GE) error",
        _ => "unknown code",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_their_call_code_and_message() {
        let e = AclError {
            call: "aclmdlExecute",
            code: 100017,
            message: "input 2 has 12 bytes, expected 16\n".into(),
        };
        assert_eq!(
            e.to_string(),
            "aclmdlExecute failed with ACL error 100017 (ACL_ERROR_MODEL_INPUT_NOT_MATCH): input 2 has 12 bytes, expected 16"
        );
        assert_eq!(code_name(507011), "a runtime (aclrt) error");
    }
}
