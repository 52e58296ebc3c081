//! `colony msg`: publish, subscribe (competing or broadcast consumers, acknowledging what it
//! printed), request and serve (request-response), ack by hand, and topic administration.

use crate::output::{self, OutputFormat};
use crate::GlobalArgs;
use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Args, Subcommand};
use colony_client::{Client, ClientConfig};
use colony_proto::pb;
use serde::Serialize;
use std::io::{BufRead as _, Read as _, Write as _};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Subcommand)]
pub enum MsgCommand {
    /// Publish a message; prints its sequence number once a majority stored it.
    ///
    /// With --lines, each line of the input is its own message (empty lines are skipped), sent
    /// 1,000 to a PublishBatch call; each line is refused or stored on its own, and the command
    /// fails if any was refused.
    ///
    /// Example: colony msg publish topics/papers '{"title": "Raft"}' --priority 5
    ///          colony msg publish topics/papers @papers.jsonl --lines
    Publish(PublishArgs),
    /// Receive messages as a named consumer, print them and acknowledge them.
    ///
    /// Callers with the same --consumer share the messages; every distinct name gets them all.
    /// A message printed but not acknowledged (the command killed first) is delivered again after
    /// its ack deadline. Table output is one line per message; --output json is one JSON object
    /// per line.
    Subscribe(SubscribeArgs),
    /// Send a request to a mailbox and print the answer.
    ///
    /// Example: colony msg request agents/researcher '{"q": "raft"}' --timeout 30s
    Request(RequestArgs),
    /// Answer requests on a mailbox with a command: each request's payload on its stdin, its
    /// stdout the answer. A request whose command fails is not acknowledged (it comes back).
    ///
    /// Example: colony msg serve agents/researcher --consumer researchers -- python3 answer.py
    Serve(ServeArgs),
    /// Acknowledge deliveries by hand (after `subscribe --no-ack`): SEQ:DELIVERY ...
    Ack(AckArgs),
    /// Topics and mailboxes with their messages and consumers.
    Topics(TopicsArgs),
    /// Create a topic with a policy, or change an existing topic's policy.
    CreateTopic(CreateTopicArgs),
    /// Delete a topic and its messages.
    DeleteTopic(DeleteTopicArgs),
}

#[derive(Debug, Args)]
pub struct Namespace {
    /// The namespace of the topic.
    #[arg(long, default_value = colony_core::DEFAULT_NAMESPACE)]
    namespace: String,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    topic: String,
    /// The payload; `-` reads stdin, `@FILE` reads a file.
    payload: String,
    /// 0 (the default, lowest) to 9: higher is delivered first.
    #[arg(long, default_value_t = 0)]
    priority: u32,
    /// A publish with a key the topic still holds is stored once. Without one, a random key is
    /// used, so the command's own retries never store the message twice.
    #[arg(long, conflicts_with = "lines")]
    key: Option<String>,
    /// Each line of the payload (`-` or `@FILE`) is a message, with a key of its own.
    #[arg(long)]
    lines: bool,
    /// For an answer: the mailbox it goes to, and the request's correlation id.
    #[arg(long)]
    reply_to: Option<String>,
    #[arg(long)]
    correlation_id: Option<String>,
    #[command(flatten)]
    namespace: Namespace,
}

#[derive(Debug, Args)]
pub struct SubscribeArgs {
    topic: String,
    /// The consumer name.
    #[arg(long)]
    consumer: String,
    /// Stop after this many messages (default: run until interrupted).
    #[arg(long)]
    count: Option<u64>,
    /// Stop when no message came for this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// Messages asked for at once.
    #[arg(long, default_value_t = 100)]
    batch: u32,
    /// How long this subscriber has to acknowledge (default: the topic's).
    #[arg(long, value_parser = humantime::parse_duration)]
    ack_deadline: Option<Duration>,
    /// Print without acknowledging: ack later with `colony msg ack`, or the messages come back.
    #[arg(long)]
    no_ack: bool,
    #[command(flatten)]
    namespace: Namespace,
}

#[derive(Debug, Args)]
pub struct RequestArgs {
    topic: String,
    /// The payload; `-` reads stdin, `@FILE` reads a file.
    payload: String,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[arg(long, default_value_t = 0)]
    priority: u32,
    #[command(flatten)]
    namespace: Namespace,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    topic: String,
    #[arg(long)]
    consumer: String,
    /// Stop after answering this many requests.
    #[arg(long)]
    count: Option<u64>,
    /// The longest the command may run for one request.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    command_timeout: Duration,
    #[command(flatten)]
    namespace: Namespace,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct AckArgs {
    topic: String,
    #[arg(long)]
    consumer: String,
    /// Deliveries as SEQ:DELIVERY, as `subscribe` prints them.
    #[arg(required = true, value_parser = parse_delivery)]
    deliveries: Vec<pb::DeliveryRef>,
    #[command(flatten)]
    namespace: Namespace,
}

#[derive(Debug, Args)]
pub struct TopicsArgs {
    /// Only this namespace (default: every one the token covers).
    #[arg(long)]
    namespace: Option<String>,
}

#[derive(Debug, Args)]
pub struct CreateTopicArgs {
    topic: String,
    #[arg(long)]
    max_messages: Option<u64>,
    /// Bytes of payload kept, e.g. 64MiB.
    #[arg(long)]
    max_bytes: Option<String>,
    #[arg(long, value_parser = humantime::parse_duration)]
    max_age: Option<Duration>,
    /// What a publish to a full topic does: reject (the default) or drop-oldest.
    #[arg(long)]
    when_full: Option<String>,
    /// Deliveries without an ack before a message becomes a dead letter.
    #[arg(long)]
    max_deliveries: Option<u32>,
    #[arg(long, value_parser = humantime::parse_duration)]
    ack_deadline: Option<Duration>,
    #[arg(long)]
    max_consumers: Option<u32>,
    #[command(flatten)]
    namespace: Namespace,
}

#[derive(Debug, Args)]
pub struct DeleteTopicArgs {
    topic: String,
    #[command(flatten)]
    namespace: Namespace,
}

fn parse_delivery(text: &str) -> Result<pb::DeliveryRef, String> {
    let (seq, delivery) =
        text.split_once(':').ok_or_else(|| format!("{text:?} is not SEQ:DELIVERY"))?;
    Ok(pb::DeliveryRef {
        seq: seq.parse().map_err(|_| format!("{seq:?} is not a sequence number"))?,
        delivery: delivery.parse().map_err(|_| format!("{delivery:?} is not a delivery number"))?,
    })
}

/// The payload named on the command line: a literal, `-` for stdin, `@FILE` for a file. Read with
/// a bound one byte past the message limit, so an oversized one is refused before it is sent.
fn read_payload(arg: &str) -> Result<Vec<u8>> {
    let limit = colony_core::MessageLimits::default().payload_bytes_max as u64 + 1;
    let mut data = Vec::new();
    if arg == "-" {
        std::io::stdin().take(limit).read_to_end(&mut data).context("reading stdin")?;
    } else if let Some(path) = arg.strip_prefix('@') {
        let file =
            std::fs::File::open(PathBuf::from(path)).with_context(|| format!("opening {path}"))?;
        file.take(limit).read_to_end(&mut data).with_context(|| format!("reading {path}"))?;
    } else {
        data = arg.as_bytes().to_vec();
    }
    if data.len() as u64 >= limit {
        bail!("the message is over the {} byte limit", limit - 1);
    }
    Ok(data)
}

/// A client whose calls may wait `wait` for an answer on top of the usual timeout.
fn long_client(global: &GlobalArgs, wait: Duration) -> Result<Client> {
    let config = ClientConfig {
        attempt_timeout_max: wait + Duration::from_secs(5),
        ..ClientConfig::new(global.timeout + wait)
    };
    Ok(Client::with_config(&global.endpoint, config, &global.auth()?)?)
}

/// A message as scripts read it: the payload as text when it is UTF-8, else as hex.
#[derive(Serialize)]
struct MessageJson<'a> {
    topic: &'a str,
    seq: u64,
    delivery: u32,
    priority: u32,
    published_unix_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_hex: Option<String>,
    #[serde(skip_serializing_if = "str::is_empty")]
    reply_to: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    correlation_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    dead_letter_topic: &'a str,
}

fn print_message(topic: &str, delivery: u32, m: &pb::Message, format: OutputFormat) -> Result<()> {
    let text = std::str::from_utf8(&m.payload).ok();
    match format {
        OutputFormat::Json => {
            let json = MessageJson {
                topic,
                seq: m.seq,
                delivery,
                priority: m.priority,
                published_unix_ms: m.published_unix_ms,
                payload: text,
                payload_hex: text.is_none().then(|| hex::encode(&m.payload)),
                reply_to: &m.reply_to,
                correlation_id: &m.correlation_id,
                dead_letter_topic: &m.dead_letter_topic,
            };
            output::out(serde_json::to_string(&json)?)
        }
        OutputFormat::Table => {
            let shown = match text {
                Some(text) => text.replace('\n', "\\n"),
                None => format!("({} bytes, hex {})", m.payload.len(), hex::encode(&m.payload)),
            };
            output::out(format!("{}:{}  p{}  {shown}", m.seq, delivery, m.priority))
        }
    }
}

pub async fn run(command: MsgCommand, global: &GlobalArgs) -> Result<()> {
    match command {
        MsgCommand::Publish(args) => publish(args, global).await,
        MsgCommand::Subscribe(args) => subscribe(args, global).await,
        MsgCommand::Request(args) => request(args, global).await,
        MsgCommand::Serve(args) => serve(args, global).await,
        MsgCommand::Ack(args) => {
            let client = global.client()?;
            let request = pb::AckRequest {
                namespace: args.namespace.namespace,
                topic: args.topic,
                consumer: args.consumer,
                deliveries: args.deliveries,
            };
            ack(&client, request).await
        }
        MsgCommand::Topics(args) => topics(args, global).await,
        MsgCommand::CreateTopic(args) => create_topic(args, global).await,
        MsgCommand::DeleteTopic(args) => {
            let client = global.client()?;
            let request =
                pb::DeleteTopicRequest { namespace: args.namespace.namespace, topic: args.topic };
            let response = client
                .call("delete topic", |mut c| {
                    let request = request.clone();
                    async move { c.delete_topic(request).await }
                })
                .await?;
            output::out(format!("deleted with {} messages", response.messages))
        }
    }
}

async fn publish(args: PublishArgs, global: &GlobalArgs) -> Result<()> {
    if args.lines {
        return publish_lines(args, global).await;
    }
    let payload = read_payload(&args.payload)?;
    let client = global.client()?;
    let request = pb::PublishRequest {
        namespace: args.namespace.namespace,
        topic: args.topic,
        payload,
        priority: args.priority,
        idempotency_key: args.key.unwrap_or_else(|| hex::encode(rand::random::<[u8; 16]>())),
        reply_to: args.reply_to.unwrap_or_default(),
        correlation_id: args.correlation_id.unwrap_or_default(),
    };
    let response = client
        .call("publish", |mut c| {
            let request = request.clone();
            async move { c.publish(request).await }
        })
        .await?;
    match global.output {
        OutputFormat::Table => output::out(response.seq),
        OutputFormat::Json => output::print_json(&serde_json::json!({
            "seq": response.seq,
            "existing": response.existing,
            "dropped": response.dropped,
        })),
    }
}

/// Lines sent in one PublishBatch call (the server takes at most 1,000).
const LINES_PER_CALL: usize = 1000;

/// One line the servers refused.
#[derive(Serialize)]
struct RefusedLine {
    line: u64,
    code: String,
    message: String,
}

#[derive(Serialize, Default)]
struct LinesPublished {
    topic: String,
    /// Lines stored (or already stored under their key by an earlier try).
    published: u64,
    first_seq: Option<u64>,
    last_seq: Option<u64>,
    /// Older messages the topic dropped to make room (a `drop-oldest` topic).
    dropped: u64,
    refused: Vec<RefusedLine>,
}

/// `publish --lines`: the input read a line at a time (each bounded like a message), sent in
/// batches with a key per line, so a batch retried through another server stores nothing twice.
async fn publish_lines(args: PublishArgs, global: &GlobalArgs) -> Result<()> {
    let input: Box<dyn std::io::BufRead> = match args.payload.as_str() {
        "-" => Box::new(std::io::stdin().lock()),
        arg => match arg.strip_prefix('@') {
            Some(path) => Box::new(std::io::BufReader::new(
                std::fs::File::open(path).with_context(|| format!("opening {path}"))?,
            )),
            None => bail!("--lines reads its messages from `-` (stdin) or `@FILE`"),
        },
    };
    let client = global.client()?;
    let key_prefix = hex::encode(rand::random::<[u8; 8]>());
    let bar = indicatif::ProgressBar::new_spinner().with_style(
        indicatif::ProgressStyle::with_template("{spinner} {pos} lines published to {msg}")
            .context("bad progress template")?,
    );
    bar.set_message(args.topic.clone());
    let mut report = LinesPublished { topic: args.topic.clone(), ..Default::default() };
    let limit = colony_core::MessageLimits::default().payload_bytes_max as u64;
    let mut lines = LineReader::new(input, limit);
    loop {
        let mut batch = Vec::new();
        let mut numbers = Vec::new();
        while batch.len() < LINES_PER_CALL {
            let (number, payload) = match lines.next_line()? {
                None => break,
                Some(Line::Message(number, payload)) => (number, payload),
                Some(Line::TooLong(line)) => {
                    report.refused.push(RefusedLine {
                        line,
                        code: format!("{:?}", tonic::Code::InvalidArgument),
                        message: format!("the line is over the {limit} byte message limit"),
                    });
                    continue;
                }
            };
            batch.push(pb::PublishRequest {
                namespace: args.namespace.namespace.clone(),
                topic: args.topic.clone(),
                payload,
                priority: args.priority,
                idempotency_key: format!("{key_prefix}-{number}"),
                reply_to: args.reply_to.clone().unwrap_or_default(),
                correlation_id: args.correlation_id.clone().unwrap_or_default(),
            });
            numbers.push(number);
        }
        if batch.is_empty() {
            break;
        }
        let request = pb::PublishBatchRequest { messages: batch };
        let results = client
            .call("publish batch", |mut c| {
                let request = request.clone();
                async move { c.publish_batch(request).await }
            })
            .await?
            .results;
        if results.len() != numbers.len() {
            bail!("the server answered {} results for {} lines", results.len(), numbers.len());
        }
        for (line, result) in numbers.into_iter().zip(results) {
            match result.result {
                Some(pb::publish_result::Result::Published(p)) => {
                    report.published += 1;
                    report.first_seq.get_or_insert(p.seq);
                    report.last_seq = Some(p.seq);
                    report.dropped += p.dropped;
                }
                Some(pb::publish_result::Result::Error(e)) => report.refused.push(RefusedLine {
                    line,
                    code: format!("{:?}", tonic::Code::from_i32(e.code)),
                    message: e.message,
                }),
                None => bail!("the server answered line {line} with no result"),
            }
        }
        bar.set_position(report.published);
    }
    bar.finish_and_clear();
    match global.output {
        OutputFormat::Json => output::print_json(&report)?,
        OutputFormat::Table => {
            for refused in &report.refused {
                eprintln!("line {}: refused ({}): {}", refused.line, refused.code, refused.message);
            }
            let seqs = match (report.first_seq, report.last_seq) {
                (Some(first), Some(last)) => format!(", seq {first} to {last}"),
                _ => String::new(),
            };
            output::out(format!(
                "{} lines published to {}{seqs}; {} refused",
                report.published,
                report.topic,
                report.refused.len()
            ))?;
        }
    }
    if !report.refused.is_empty() {
        bail!("{} of the lines were refused", report.refused.len());
    }
    Ok(())
}

/// One line of `publish --lines` input.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Message(u64, Vec<u8>),
    /// Over the message limit: skipped, never held whole.
    TooLong(u64),
}

/// Reads lines one at a time, each bounded by the message limit before it is held whole.
struct LineReader<R> {
    input: R,
    number: u64,
    limit: u64,
}

impl<R: std::io::BufRead> LineReader<R> {
    fn new(input: R, limit: u64) -> LineReader<R> {
        LineReader { input, number: 0, limit }
    }

    /// The next non-empty line (without its line ending) with its number, from 1.
    fn next_line(&mut self) -> Result<Option<Line>> {
        loop {
            let mut line = Vec::new();
            // The limit, a byte more and the newline: enough to tell an oversized line.
            let read = (&mut self.input)
                .take(self.limit + 2)
                .read_until(b'\n', &mut line)
                .context("reading the input")?;
            if read == 0 {
                return Ok(None);
            }
            self.number += 1;
            let ended = line.last() == Some(&b'\n');
            if ended {
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
            }
            if line.len() as u64 > self.limit {
                if !ended {
                    self.skip_rest_of_line()?;
                }
                return Ok(Some(Line::TooLong(self.number)));
            }
            if !line.is_empty() {
                return Ok(Some(Line::Message(self.number, line)));
            }
        }
    }

    fn skip_rest_of_line(&mut self) -> Result<()> {
        loop {
            let buffer = self.input.fill_buf().context("reading the input")?;
            if buffer.is_empty() {
                return Ok(());
            }
            match buffer.iter().position(|b| *b == b'\n') {
                Some(at) => {
                    self.input.consume(at + 1);
                    return Ok(());
                }
                None => {
                    let len = buffer.len();
                    self.input.consume(len);
                }
            }
        }
    }
}

/// The longest one receive call waits on the server.
const RECEIVE_WAIT: Duration = Duration::from_secs(10);

async fn subscribe(args: SubscribeArgs, global: &GlobalArgs) -> Result<()> {
    let client = long_client(global, RECEIVE_WAIT)?;
    let mut seen = 0u64;
    let mut last_message = Instant::now();
    loop {
        let remaining = args.count.map(|c| c.saturating_sub(seen));
        if remaining == Some(0) {
            return Ok(());
        }
        let mut wait = RECEIVE_WAIT;
        if let Some(idle) = args.idle_timeout {
            let left = idle.saturating_sub(last_message.elapsed());
            if left.is_zero() {
                return Ok(());
            }
            wait = wait.min(left);
        }
        let max = remaining.map_or(args.batch, |r| r.min(args.batch.into()) as u32);
        let request = pb::ReceiveRequest {
            namespace: args.namespace.namespace.clone(),
            topic: args.topic.clone(),
            consumer: args.consumer.clone(),
            max,
            ack_deadline_ms: args.ack_deadline.map_or(0, |d| d.as_millis() as u64),
            wait_ms: wait.as_millis() as u64,
        };
        let response = client
            .call("receive", |mut c| {
                let request = request.clone();
                async move { c.receive(request).await }
            })
            .await?;
        for seq in &response.dead_lettered {
            eprintln!("message {seq} passed its deliveries and went to dead-letter/{}", args.topic);
        }
        if response.deliveries.is_empty() {
            continue;
        }
        last_message = Instant::now();
        let mut acks = Vec::with_capacity(response.deliveries.len());
        for d in &response.deliveries {
            let message = d.message.as_ref().ok_or_else(|| anyhow!("a delivery has no message"))?;
            print_message(&args.topic, d.delivery, message, global.output)?;
            acks.push(pb::DeliveryRef { seq: message.seq, delivery: d.delivery });
        }
        std::io::stdout().flush()?;
        seen += acks.len() as u64;
        if !args.no_ack {
            let request = pb::AckRequest {
                namespace: args.namespace.namespace.clone(),
                topic: args.topic.clone(),
                consumer: args.consumer.clone(),
                deliveries: acks,
            };
            ack(&client, request).await?;
        }
    }
}

async fn ack(client: &Client, request: pb::AckRequest) -> Result<()> {
    let response = client
        .call("ack", |mut c| {
            let request = request.clone();
            async move { c.ack(request).await }
        })
        .await?;
    if let Some(first) = response.refused.first() {
        for refused in &response.refused {
            eprintln!("ack of message {} refused: {}", refused.seq, refused.reason);
        }
        bail!(
            "{} of {} acks refused (first: {})",
            response.refused.len(),
            request.deliveries.len(),
            first.reason
        );
    }
    Ok(())
}

async fn request(args: RequestArgs, global: &GlobalArgs) -> Result<()> {
    let payload = read_payload(&args.payload)?;
    let client = long_client(global, args.timeout)?;
    let request = pb::RequestRequest {
        namespace: args.namespace.namespace,
        topic: args.topic.clone(),
        payload,
        priority: args.priority,
        timeout_ms: args.timeout.as_millis() as u64,
    };
    // Retried through a server failure like every call: a request is delivered at least once,
    // so a responder may see it twice.
    let response = client
        .call("request", |mut c| {
            let request = request.clone();
            async move { c.request(request).await }
        })
        .await?;
    let reply = response.reply.ok_or_else(|| anyhow!("the server's answer has no reply"))?;
    match global.output {
        OutputFormat::Json => print_message(&args.topic, 1, &reply, OutputFormat::Json),
        OutputFormat::Table => {
            std::io::stdout().write_all(&reply.payload)?;
            if !reply.payload.ends_with(b"\n") {
                output::out("")?;
            }
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs, global: &GlobalArgs) -> Result<()> {
    let client = long_client(global, RECEIVE_WAIT)?;
    let mut answered = 0u64;
    while args.count.is_none_or(|c| answered < c) {
        let request = pb::ReceiveRequest {
            namespace: args.namespace.namespace.clone(),
            topic: args.topic.clone(),
            consumer: args.consumer.clone(),
            max: 1,
            // The command's own bound, plus time to publish the answer and ack.
            ack_deadline_ms: (args.command_timeout + Duration::from_secs(10)).as_millis() as u64,
            wait_ms: RECEIVE_WAIT.as_millis() as u64,
        };
        let response = client
            .call("receive", |mut c| {
                let request = request.clone();
                async move { c.receive(request).await }
            })
            .await?;
        for d in response.deliveries {
            let message = d.message.ok_or_else(|| anyhow!("a delivery has no message"))?;
            let answer =
                match run_handler(&args.command, &message.payload, args.command_timeout).await {
                    Ok(answer) => answer,
                    Err(e) => {
                        eprintln!(
                            "request {}: {e:#}; not acknowledged, it will be delivered again",
                            message.seq
                        );
                        continue;
                    }
                };
            if !message.reply_to.is_empty() {
                let reply = pb::PublishRequest {
                    namespace: args.namespace.namespace.clone(),
                    topic: message.reply_to.clone(),
                    payload: answer,
                    priority: message.priority,
                    idempotency_key: format!("reply-{}", message.correlation_id),
                    reply_to: String::new(),
                    correlation_id: message.correlation_id.clone(),
                };
                let published = client
                    .call("reply", |mut c| {
                        let reply = reply.clone();
                        async move { c.publish(reply).await }
                    })
                    .await;
                if let Err(e) = published {
                    // The requester gave up and its mailbox is gone: nothing to answer.
                    eprintln!("request {}: the answer could not be delivered: {e}", message.seq);
                }
            }
            let ack_request = pb::AckRequest {
                namespace: args.namespace.namespace.clone(),
                topic: args.topic.clone(),
                consumer: args.consumer.clone(),
                deliveries: vec![pb::DeliveryRef { seq: message.seq, delivery: d.delivery }],
            };
            ack(&client, ack_request).await?;
            answered += 1;
        }
    }
    Ok(())
}

/// Runs the handler with `payload` on stdin; its stdout (bounded by the message limit) is the
/// answer. A non-zero exit or a timeout is an error.
async fn run_handler(command: &[String], payload: &[u8], timeout: Duration) -> Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (program, args) = command.split_first().ok_or_else(|| anyhow!("no command given"))?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
    let mut stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let limit = colony_core::MessageLimits::default().payload_bytes_max as u64;
    let work = async {
        stdin.write_all(payload).await?;
        drop(stdin);
        let mut answer = Vec::new();
        (&mut stdout).take(limit + 1).read_to_end(&mut answer).await?;
        let status = child.wait().await?;
        anyhow::Ok((answer, status))
    };
    let (answer, status) = tokio::time::timeout(timeout, work).await.map_err(|_| {
        anyhow!("{program} took longer than {}", humantime::format_duration(timeout))
    })??;
    if !status.success() {
        bail!("{program} {status}");
    }
    if answer.len() as u64 > limit {
        bail!("{program} wrote more than the {limit} byte message limit");
    }
    Ok(answer)
}

async fn topics(args: TopicsArgs, global: &GlobalArgs) -> Result<()> {
    let client = global.client()?;
    let mut all = Vec::new();
    let (mut after_namespace, mut after_name) = (String::new(), String::new());
    loop {
        let request = pb::ListTopicsRequest {
            namespace: args.namespace.clone().unwrap_or_default(),
            after_namespace: after_namespace.clone(),
            after_name: after_name.clone(),
            page_size: 1000,
            consistency: None,
        };
        let page = client
            .call("list topics", |mut c| {
                let request = request.clone();
                async move { c.list_topics(request).await }
            })
            .await?;
        all.extend(page.topics);
        if page.next_after_name.is_empty() {
            break;
        }
        (after_namespace, after_name) = (page.next_after_namespace, page.next_after_name);
    }
    match global.output {
        OutputFormat::Json => output::print_json(&all.iter().map(topic_json).collect::<Vec<_>>()),
        OutputFormat::Table => {
            let mut table = output::table([
                "NAMESPACE",
                "TOPIC",
                "MESSAGES",
                "BYTES",
                "PUBLISHED",
                "DROPPED",
                "CONSUMER",
                "READY",
                "IN-FLIGHT",
                "ACKED",
                "DEAD",
            ]);
            for t in &all {
                let base = [
                    t.namespace.clone(),
                    t.name.clone(),
                    t.messages.to_string(),
                    t.bytes.to_string(),
                    t.published.to_string(),
                    t.dropped.to_string(),
                ];
                if t.consumers.is_empty() {
                    let mut row = base.to_vec();
                    row.extend([
                        "-".to_owned(),
                        String::new(),
                        String::new(),
                        String::new(),
                        String::new(),
                    ]);
                    table.add_row(row);
                }
                for c in &t.consumers {
                    let mut row = base.to_vec();
                    row.extend([
                        c.name.clone(),
                        c.ready.to_string(),
                        c.in_flight.to_string(),
                        c.acked.to_string(),
                        c.dead_lettered.to_string(),
                    ]);
                    table.add_row(row);
                }
            }
            output::print_table(table)
        }
    }
}

fn topic_json(t: &pb::TopicInfo) -> serde_json::Value {
    let policy = t.policy.clone().unwrap_or_default();
    serde_json::json!({
        "namespace": t.namespace,
        "name": t.name,
        "messages": t.messages,
        "bytes": t.bytes,
        "published": t.published,
        "dropped": t.dropped,
        "policy": {
            "max_messages": policy.max_messages,
            "max_bytes": policy.max_bytes,
            "max_age_ms": policy.max_age_ms,
            "when_full": policy.when_full,
            "max_deliveries": policy.max_deliveries,
            "ack_deadline_ms": policy.ack_deadline_ms,
            "max_consumers": policy.max_consumers,
        },
        "consumers": t.consumers.iter().map(|c| serde_json::json!({
            "name": c.name,
            "ready": c.ready,
            "in_flight": c.in_flight,
            "delivered": c.delivered,
            "acked": c.acked,
            "dead_lettered": c.dead_lettered,
        })).collect::<Vec<_>>(),
    })
}

async fn create_topic(args: CreateTopicArgs, global: &GlobalArgs) -> Result<()> {
    let max_bytes = match &args.max_bytes {
        Some(text) => colony_core::parse_memory_bytes(text)
            .map_err(|e| anyhow!("--max-bytes {text:?}: {e}"))?,
        None => 0,
    };
    let policy = pb::TopicPolicy {
        max_messages: args.max_messages.unwrap_or(0),
        max_bytes,
        max_age_ms: args.max_age.map_or(0, |d| d.as_millis() as u64),
        when_full: args.when_full.unwrap_or_default(),
        max_deliveries: args.max_deliveries.unwrap_or(0),
        ack_deadline_ms: args.ack_deadline.map_or(0, |d| d.as_millis() as u64),
        max_consumers: args.max_consumers.unwrap_or(0),
    };
    let client = global.client()?;
    let request = pb::CreateTopicRequest {
        namespace: args.namespace.namespace,
        topic: args.topic.clone(),
        policy: Some(policy),
    };
    let response = client
        .call("create topic", |mut c| {
            let request = request.clone();
            async move { c.create_topic(request).await }
        })
        .await?;
    output::out(match response.created {
        true => format!("created {}", args.topic),
        false => format!("{} existed; its policy is updated", args.topic),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(input: &[u8], limit: u64) -> Vec<Line> {
        let mut reader = LineReader::new(std::io::BufReader::with_capacity(4, input), limit);
        let mut lines = Vec::new();
        loop {
            match reader.next_line() {
                Ok(Some(line)) => lines.push(line),
                Ok(None) => return lines,
                Err(e) => panic!("reading from memory failed: {e:#}"),
            }
        }
    }

    #[test]
    fn lines_are_numbered_and_empty_ones_skipped() {
        let lines = read_all(b"one\r\n\ntwo\nthree", 8);
        let expected = vec![
            Line::Message(1, b"one".to_vec()),
            Line::Message(3, b"two".to_vec()),
            Line::Message(4, b"three".to_vec()),
        ];
        assert_eq!(lines, expected);
    }

    #[test]
    fn an_oversized_line_is_refused_alone_and_reading_goes_on() {
        let lines = read_all(b"12345678\n123456789\nok\n123456789012345678901234567890", 8);
        let expected = vec![
            Line::Message(1, b"12345678".to_vec()),
            Line::TooLong(2),
            Line::Message(3, b"ok".to_vec()),
            Line::TooLong(4),
        ];
        assert_eq!(lines, expected);
        // Far longer than the limit, then more lines.
        let mut input = vec![b'x'; 100];
        input.extend_from_slice(b"\nafter\n");
        assert_eq!(
            read_all(&input, 8),
            vec![Line::TooLong(1), Line::Message(2, b"after".to_vec())]
        );
    }
}
