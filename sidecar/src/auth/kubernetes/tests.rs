//! Token verification against a fixture issuer: two throwaway P-256 keys made for these tests
//! (`test-issuer-key.pem` signs like the cluster; `test-other-key.pem` is a stranger's).

use std::sync::atomic::{AtomicU32, Ordering};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

use super::*;

const ISSUER_KEY: &[u8] = include_bytes!("test-issuer-key.pem");
const OTHER_KEY: &[u8] = include_bytes!("test-other-key.pem");
const ISSUER: &str = "https://kubernetes.default.svc";
const OPERATOR: &str = "system:serviceaccount:forkscope:forkscope-operator";

struct Fixture {
    fetches: AtomicU32,
}

impl KeySource for Fixture {
    fn fetch(&self) -> KeysFuture<'_> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        Box::pin(async {
            let key = EncodingKey::from_ec_pem(ISSUER_KEY).expect("key");
            let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).expect("jwk");
            jwk.common.key_id = Some("k1".into());
            Ok(IssuerKeys {
                issuer: ISSUER.into(),
                keys: JwkSet { keys: vec![jwk] },
            })
        })
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn token(key: &[u8], kid: &str, claims: serde_json::Value) -> Vec<u8> {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_ec_pem(key).expect("key"),
    )
    .expect("sign")
    .into_bytes()
}

fn claims(sub: &str, aud: &str, exp_in: i64) -> serde_json::Value {
    json!({"iss": ISSUER, "sub": sub, "aud": [aud], "iat": now(), "nbf": now() - 1, "exp": now() + exp_in})
}

fn auth() -> (KubernetesAuth, Arc<Fixture>) {
    let fixture = Arc::new(Fixture {
        fetches: AtomicU32::new(0),
    });
    let auth = KubernetesAuth::new(
        "forkscope-sidecar".into(),
        vec![OPERATOR.into()],
        fixture.clone(),
    );
    (auth, fixture)
}

#[tokio::test]
async fn the_operators_token_for_the_sidecar_audience_is_accepted() {
    let (auth, _) = auth();
    let t = token(ISSUER_KEY, "k1", claims(OPERATOR, "forkscope-sidecar", 600));
    assert_eq!(auth.verify(&t).await, Ok(OPERATOR.to_owned()));
}

#[tokio::test]
async fn invalid_tokens_are_unauthenticated() {
    let (auth, _) = auth();
    let cases = [
        (
            "wrong audience",
            token(
                ISSUER_KEY,
                "k1",
                claims(OPERATOR, "https://kubernetes.default.svc", 600),
            ),
        ),
        (
            "expired",
            token(
                ISSUER_KEY,
                "k1",
                claims(OPERATOR, "forkscope-sidecar", -120),
            ),
        ),
        (
            "signed by another key",
            token(OTHER_KEY, "k1", claims(OPERATOR, "forkscope-sidecar", 600)),
        ),
        (
            "unknown key id",
            token(ISSUER_KEY, "k2", claims(OPERATOR, "forkscope-sidecar", 600)),
        ),
        (
            "another issuer",
            token(ISSUER_KEY, "k1", {
                let mut c = claims(OPERATOR, "forkscope-sidecar", 600);
                c["iss"] = json!("https://evil.example");
                c
            }),
        ),
        ("not a JWT", b"s3cret".to_vec()),
    ];
    for (what, t) in cases {
        assert_eq!(
            auth.verify(&t).await,
            Err(Denied::Unauthenticated),
            "{what}"
        );
    }
}

#[tokio::test]
async fn a_valid_token_of_another_caller_is_forbidden() {
    let (auth, _) = auth();
    let app = "system:serviceaccount:shop:web";
    let t = token(ISSUER_KEY, "k1", claims(app, "forkscope-sidecar", 600));
    assert_eq!(
        auth.verify(&t).await,
        Err(Denied::Forbidden(app.to_owned()))
    );
}

#[tokio::test]
async fn keys_are_cached_and_unknown_key_ids_cannot_hammer_the_issuer() {
    let (auth, fixture) = auth();
    let good = token(ISSUER_KEY, "k1", claims(OPERATOR, "forkscope-sidecar", 600));
    let unknown = token(ISSUER_KEY, "k9", claims(OPERATOR, "forkscope-sidecar", 600));
    for _ in 0..5 {
        assert!(auth.verify(&good).await.is_ok());
        assert!(auth.verify(&unknown).await.is_err());
    }
    assert_eq!(fixture.fetches.load(Ordering::SeqCst), 1);
}
