//! ACL tokens and join token kinds in the state machine: bootstrapped once, created within their
//! bounds, revoked, and a refused command changes nothing.

use colony_core::{
    AclToken, Command, CommandError, Grant, JoinKind, Outcome, Proposal, Role, StateMachine,
};

const NOW: u64 = 1_700_000_000_000;

fn token(accessor: &str, secret: u8, grant: Grant) -> AclToken {
    AclToken {
        accessor: accessor.to_owned(),
        secret_hash: [secret; 32],
        grant,
        description: String::new(),
        created_unix_ms: NOW,
        expires_unix_ms: None,
    }
}

fn apply(sm: &mut StateMachine, now: u64, command: Command) -> Result<Outcome, CommandError> {
    let mut results = sm.apply_proposal(&Proposal { now_unix_ms: now, commands: vec![command] });
    results.remove(0)
}

/// Applies `command`, which must be refused, and checks the state did not change.
fn refused(sm: &mut StateMachine, now: u64, command: Command) -> CommandError {
    // Advance the clock first, so the comparison sees only what the command itself did.
    let _ = sm.apply_proposal(&Proposal { now_unix_ms: now, commands: vec![] });
    let before = sm.clone();
    let error = apply(sm, now, command).expect_err("refused");
    assert_eq!(*sm, before, "a refused command changed the state");
    error
}

#[test]
fn bootstrap_happens_once_and_only_for_an_admin_token() {
    let mut sm = StateMachine::new();
    let scoped = Grant { role: Role::Admin, namespaces: Some(["a".to_owned()].into()) };
    assert!(matches!(
        refused(&mut sm, NOW, Command::BootstrapAcl(token("x", 1, scoped))),
        CommandError::InvalidSpec(_)
    ));
    let admin = token("root", 1, Grant::everywhere(Role::Admin));
    assert_eq!(
        apply(&mut sm, NOW, Command::BootstrapAcl(admin.clone())),
        Ok(Outcome::AclBootstrapped)
    );
    assert!(sm.acl_bootstrapped());
    assert_eq!(sm.acl_token_by_secret(&[1; 32]), Some(&admin));
    let again = token("root2", 2, Grant::everywhere(Role::Admin));
    assert_eq!(
        refused(&mut sm, NOW, Command::BootstrapAcl(again)),
        CommandError::AclAlreadyBootstrapped
    );
    sm.check_invariants().expect("invariants");
}

#[test]
fn tokens_are_created_checked_and_revoked() {
    let mut sm = StateMachine::new();
    let reader = token(
        "r",
        3,
        Grant { role: Role::Reader, namespaces: Some(["default".to_owned()].into()) },
    );
    assert_eq!(
        apply(&mut sm, NOW, Command::CreateAclToken(reader.clone())),
        Ok(Outcome::AclTokenCreated)
    );
    // The same accessor or the same secret again, a server role, a past expiry, bad namespaces.
    assert_eq!(
        refused(
            &mut sm,
            NOW,
            Command::CreateAclToken(token("r", 4, Grant::everywhere(Role::Reader)))
        ),
        CommandError::AclTokenExists
    );
    assert_eq!(
        refused(
            &mut sm,
            NOW,
            Command::CreateAclToken(token("s", 3, Grant::everywhere(Role::Reader)))
        ),
        CommandError::AclTokenExists
    );
    assert!(matches!(
        refused(
            &mut sm,
            NOW,
            Command::CreateAclToken(token("t", 5, Grant::everywhere(Role::Server)))
        ),
        CommandError::InvalidSpec(_)
    ));
    let expired = AclToken {
        expires_unix_ms: Some(NOW - 1),
        ..token("u", 6, Grant::everywhere(Role::Reader))
    };
    assert!(matches!(
        refused(&mut sm, NOW, Command::CreateAclToken(expired)),
        CommandError::DeadlinePassed { .. }
    ));
    let empty = token("v", 7, Grant { role: Role::Reader, namespaces: Some(Default::default()) });
    assert!(matches!(
        refused(&mut sm, NOW, Command::CreateAclToken(empty)),
        CommandError::InvalidSpec(_)
    ));
    let bad_name = token(
        "w",
        8,
        Grant { role: Role::Reader, namespaces: Some(["no spaces".to_owned()].into()) },
    );
    assert!(matches!(
        refused(&mut sm, NOW, Command::CreateAclToken(bad_name)),
        CommandError::InvalidSpec(_)
    ));

    assert_eq!(
        apply(&mut sm, NOW, Command::RevokeAclToken { accessor: "r".to_owned() }),
        Ok(Outcome::AclTokenRevoked)
    );
    assert_eq!(sm.acl_token_by_secret(&[3; 32]), None, "a revoked token authenticates no one");
    assert_eq!(
        refused(&mut sm, NOW, Command::RevokeAclToken { accessor: "r".to_owned() }),
        CommandError::UnknownAccessor("r".to_owned())
    );
    sm.check_invariants().expect("invariants");
}

#[test]
fn expired_tokens_are_pruned_so_the_bound_counts_live_ones() {
    let mut sm = StateMachine::new();
    let max = sm.limits().acl_tokens_max;
    for i in 0..max {
        let mut t = token(&format!("t{i}"), 0, Grant::everywhere(Role::Reader));
        t.secret_hash[..8].copy_from_slice(&(i as u64).to_le_bytes());
        t.expires_unix_ms = Some(NOW + 10);
        apply(&mut sm, NOW, Command::CreateAclToken(t)).expect("created");
    }
    let one_more = token("extra", 0xee, Grant::everywhere(Role::Reader));
    assert!(matches!(
        refused(&mut sm, NOW, Command::CreateAclToken(one_more.clone())),
        CommandError::TooMany { .. }
    ));
    // Once they expired, a new one fits and the expired ones are gone.
    assert_eq!(
        apply(&mut sm, NOW + 10, Command::CreateAclToken(one_more)),
        Ok(Outcome::AclTokenCreated)
    );
    assert_eq!(sm.acl_tokens().count(), 1);
    sm.check_invariants().expect("invariants");
}

#[test]
fn a_join_token_admits_only_its_kind() {
    let mut sm = StateMachine::new();
    apply(
        &mut sm,
        NOW,
        Command::CreateJoinToken {
            secret_hash: [9; 32],
            expires_unix_ms: NOW + 1000,
            kind: JoinKind::Server,
        },
    )
    .expect("created");
    assert!(sm.join_token_valid(&[9; 32], JoinKind::Server));
    assert!(!sm.join_token_valid(&[9; 32], JoinKind::Executor));
    let admit = Command::AdmitExecutor {
        secret_hash: [9; 32],
        expected_id: sm.next_executor_id(),
        name: "e".to_owned(),
        cert_fingerprint: [0; 32],
    };
    assert_eq!(
        refused(&mut sm, NOW, admit),
        CommandError::InvalidJoinToken { kind: JoinKind::Executor }
    );
}
