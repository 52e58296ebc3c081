//! The web console's API on a real cluster: every server serves it on its HTTP port, a request
//! needs a token, and a token sees what the admin API would show it, no more (tests/console/
//! drives the page itself in a browser).

use colony_proto::pb;
use colony_tests::{task_spec, Cluster};
use std::time::Duration;

/// A plain HTTP/1.0 GET with an optional bearer token: the status and the body as JSON (or as
/// a string when it is not JSON).
fn get(addr: &str, path: &str, token: Option<&str>) -> anyhow::Result<(u16, serde_json::Value)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let authorization = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{authorization}\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no header end in {response:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status in {head:?}"))?;
    let body = serde_json::from_str(body).unwrap_or_else(|_| serde_json::Value::from(body));
    Ok((code, body))
}

async fn token(cluster: &Cluster, role: &str, namespaces: &[&str]) -> anyhow::Result<String> {
    let mut admin = cluster.servers[0].client().await?;
    let created = admin
        .create_acl_token(pb::CreateAclTokenRequest {
            role: role.to_owned(),
            namespaces: namespaces.iter().map(|n| n.to_string()).collect(),
            ttl_ms: 3_600_000,
            description: "t65".to_owned(),
        })
        .await?
        .into_inner();
    Ok(created.secret)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_api_sees_what_the_token_may_see() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, 20_000).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let follower = &cluster.servers[(leader + 1) % 3];
    let http = follower.metrics_addr.clone();
    let mut c = cluster.servers[leader].client().await?;
    let submitted = c
        .submit_task(pb::SubmitTaskRequest { spec: Some(task_spec("console-1", None)) })
        .await?
        .into_inner()
        .task
        .map(|t| t.id)
        .unwrap_or_default();

    // The page needs no token (it holds no data); the API does.
    let (code, page) = get(&http, "/ui/", None)?;
    assert!(code == 200 && page.as_str().is_some_and(|p| p.contains("/ui/app.js")), "{code}");
    assert_eq!(get(&http, "/ui/vendor/preact.mjs", None)?.0, 200);
    let (code, body) = get(&http, "/ui/api/tasks", None)?;
    assert_eq!((code, body["code"].as_str()), (401, Some("unauthenticated")), "{body}");
    let (code, body) = get(&http, "/ui/api/overview", Some("colony1.nope.nope"))?;
    assert_eq!(code, 401, "{body}");
    assert_eq!(get(&http, "/ui/api/nothing", Some(&cluster.token))?.0, 404);

    // The management token sees the task, answered from this follower's applied state.
    let listed =
        colony_tests::wait_for("the follower to apply the task", Duration::from_secs(10), || {
            let (http, token) = (http.clone(), cluster.token.clone());
            async move {
                let (code, body) = get(&http, "/ui/api/tasks", Some(&token))?;
                anyhow::ensure!(code == 200, "{code} {body}");
                Ok(body["tasks"].as_array().is_some_and(|t| !t.is_empty()).then_some(body))
            }
        })
        .await?;
    assert_eq!(listed["tasks"][0]["id"], submitted, "{listed}");
    assert_eq!(listed["tasks"][0]["namespace"], "default");
    assert_eq!(listed["server_id"], follower.id, "a stale read is served where it arrives");
    let (code, body) = get(&http, "/ui/api/overview", Some(&cluster.token))?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["members"].as_array().map(Vec::len), Some(3));
    assert_eq!(body["leader_id"], cluster.servers[leader].id);

    // A reader of another namespace: no tasks, filtered or not; cluster reads are its role's.
    let reader = token(&cluster, "reader", &["elsewhere"]).await?;
    for path in ["/ui/api/tasks", "/ui/api/tasks?namespace=default", "/ui/api/workflows"] {
        let (code, body) = get(&http, path, Some(&reader))?;
        assert_eq!(code, 200, "{path}: {body}");
        let listed = body["tasks"].as_array().or(body["workflows"].as_array());
        assert_eq!(listed.map(Vec::len), Some(0), "{path} showed another namespace: {body}");
    }
    assert_eq!(get(&http, "/ui/api/executors", Some(&reader))?.0, 200);
    // A submitter may not read the cluster: refused, exactly as ListExecutors refuses it.
    let submitter = token(&cluster, "submitter", &["elsewhere"]).await?;
    let (code, body) = get(&http, "/ui/api/executors", Some(&submitter))?;
    assert_eq!((code, body["code"].as_str()), (403, Some("permission_denied")), "{body}");
    assert_eq!(get(&http, "/ui/api/models", Some(&submitter))?.0, 403);
    assert_eq!(get(&http, "/ui/api/overview", Some(&submitter))?.0, 200, "Status is everyone's");

    // Bad input is refused with a reason, not served.
    for bad in ["/ui/api/tasks?limit=0", "/ui/api/tasks?state=asleep", "/ui/api/tasks?x=1"] {
        let (code, body) = get(&http, bad, Some(&cluster.token))?;
        assert_eq!((code, body["code"].as_str()), (400, Some("invalid_argument")), "{bad}: {body}");
    }
    let long = format!("/ui/api/tasks?namespace={}", "n".repeat(2000));
    assert_eq!(get(&http, &long, Some(&cluster.token))?.0, 400);
    assert_eq!(get(&http, "/ui/api/workflows/abc", Some(&cluster.token))?.0, 400);
    assert_eq!(get(&http, "/ui/api/workflows/999", Some(&cluster.token))?.0, 404);

    // Each call went the admin API's way: audited where it was served, refusals as denied.
    let trail = std::fs::read_to_string(follower.data_dir.join("audit/audit.jsonl"))?;
    let denied = trail.lines().filter(|l| l.contains("\"ListExecutors\"") && l.contains("denied"));
    assert_eq!(denied.count(), 1, "{trail}");
    Ok(())
}
