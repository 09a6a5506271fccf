//! API keys: every call but health (grpc.health.v1, and KServe's ServerLive and ServerReady)
//! needs `authorization: Bearer <key>` with the scope its method needs. `edge` checks every
//! call by its method's path, so no service can forget it: missing or unknown keys are
//! UNAUTHENTICATED, a key without the scope is PERMISSION_DENIED. Health's per-model statuses
//! name the models, so asking for one needs an inference key too (`api::health`).

use tonic::Status;

use crate::config::security::{ApiKey, Scope};

/// The Models methods that change what is served.
const ADMIN_METHODS: [&str; 4] = ["LoadModel", "UnloadModel", "SetRoute", "DeleteRoute"];
/// KServe's health methods, which probes call as they call grpc.health.v1.
const KSERVE_HEALTH_METHODS: [&str; 2] = ["ServerLive", "ServerReady"];

/// The scope a call to `path` (`/package.Service/Method`) needs; `None`: open to all.
pub fn required_scope(path: &str) -> Option<Scope> {
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    match service {
        // Probes and load balancers must reach health without a key.
        "grpc.health.v1.Health" => None,
        crate::api::kserve::SERVICE_NAME if KSERVE_HEALTH_METHODS.contains(&method) => None,
        "lmserve.v1.Models" if ADMIN_METHODS.contains(&method) => Some(Scope::Admin),
        _ => Some(Scope::Inference),
    }
}

/// The scope a grpc.health.v1 call about `service` needs: the server's own statuses are open
/// to probes, while `model/...` would tell a caller without a key which models exist.
pub fn health_scope(service: &str) -> Option<Scope> {
    service
        .starts_with(super::health::MODEL_PREFIX)
        .then_some(Scope::Inference)
}

/// The configured keys; a key's scope is found by comparing against each in constant time.
pub struct KeyRing {
    keys: Vec<ApiKey>,
}

impl KeyRing {
    pub fn new(keys: Vec<ApiKey>) -> Self {
        Self { keys }
    }

    fn scope_of(&self, presented: &str) -> Option<Scope> {
        // Every key is compared in full, so the time taken says nothing about which matched.
        self.keys
            .iter()
            .filter(|key| constant_time_eq(key.key.expose().as_bytes(), presented.as_bytes()))
            .map(|key| key.scope)
            .max()
    }

    /// Whether a call that needs `needed` (`None`: nothing) may proceed with `authorization`.
    pub fn check_scope(
        &self,
        needed: Option<Scope>,
        authorization: Option<&str>,
    ) -> Result<(), Status> {
        let Some(needed) = needed else {
            return Ok(());
        };
        let Some(authorization) = authorization else {
            return Err(Status::unauthenticated(
                "this server needs an API key: send `authorization: Bearer <key>`",
            ));
        };
        let presented = bearer_token(authorization).ok_or_else(|| {
            Status::unauthenticated(
                "the authorization header is not `Bearer <key>`: send `authorization: Bearer <key>`",
            )
        })?;
        match self.scope_of(presented) {
            None => Err(Status::unauthenticated("the API key is not valid")),
            Some(scope) if scope < needed => Err(Status::permission_denied(format!(
                "this call needs a key with the {needed} scope; the key has {scope}"
            ))),
            Some(_) => Ok(()),
        }
    }
}

/// The token of a `Bearer <token>` header; the scheme's name is case-insensitive (RFC 7235).
fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut difference = a.len() ^ b.len();
    for (index, &byte) in a.iter().enumerate() {
        difference |= usize::from(byte ^ b.get(index).copied().unwrap_or(0));
    }
    difference == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::security::api_keys_from_pairs;

    #[test]
    fn each_method_needs_its_scope() {
        assert_eq!(required_scope("/grpc.health.v1.Health/Check"), None);
        assert_eq!(required_scope("/grpc.health.v1.Health/Watch"), None);
        assert_eq!(
            required_scope("/lmserve.v1.Inference/Embed"),
            Some(Scope::Inference)
        );
        assert_eq!(
            required_scope("/lmserve.v1.Models/ListModels"),
            Some(Scope::Inference)
        );
        assert_eq!(
            required_scope("/lmserve.v1.Models/SetRoute"),
            Some(Scope::Admin)
        );
        assert_eq!(
            required_scope("/lmserve.v1.Models/UnloadModel"),
            Some(Scope::Admin)
        );
        assert_eq!(
            required_scope("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Some(Scope::Inference)
        );
        assert_eq!(required_scope("/anything/else"), Some(Scope::Inference));
        assert_eq!(
            required_scope("/inference.GRPCInferenceService/ServerLive"),
            None
        );
        assert_eq!(
            required_scope("/inference.GRPCInferenceService/ServerReady"),
            None
        );
        for method in [
            "ModelReady",
            "ModelMetadata",
            "ModelInfer",
            "ModelStreamInfer",
        ] {
            assert_eq!(
                required_scope(&format!("/inference.GRPCInferenceService/{method}")),
                Some(Scope::Inference),
                "{method}"
            );
        }
    }

    #[test]
    fn keys_are_checked_for_presence_validity_and_scope() {
        let ring = KeyRing::new(
            api_keys_from_pairs("admin:adminadminadmin123,inference:readerreaderreader1").unwrap(),
        );
        let embed = "/lmserve.v1.Inference/Embed";
        let load = "/lmserve.v1.Models/LoadModel";
        let code = |path, auth| {
            ring.check_scope(required_scope(path), auth)
                .map_err(|s| s.code())
        };
        assert_eq!(code(embed, None), Err(tonic::Code::Unauthenticated));
        assert_eq!(
            code(embed, Some("Basic x")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            code(embed, Some("Bearer wrongwrongwrong123")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(code(embed, Some("Bearer readerreaderreader1")), Ok(()));
        assert_eq!(code(embed, Some("bearer readerreaderreader1")), Ok(()));
        assert_eq!(code(embed, Some("BEARER  readerreaderreader1")), Ok(()));
        assert_eq!(
            code(load, Some("Bearer readerreaderreader1")),
            Err(tonic::Code::PermissionDenied)
        );
        assert_eq!(code(load, Some("Bearer adminadminadmin123")), Ok(()));
        assert_eq!(code("/grpc.health.v1.Health/Check", None), Ok(()));
        assert_eq!(health_scope(""), None);
        assert_eq!(health_scope("liveness"), None);
        assert_eq!(health_scope("lmserve.v1.Inference"), None);
        assert_eq!(health_scope("model/tiny-lstm"), Some(Scope::Inference));
        assert_eq!(health_scope("model/tiny-lstm@1"), Some(Scope::Inference));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abcd") && !constant_time_eq(b"abcd", b"abc"));
    }
}
