//! The peers of a multi-process run over TCP: rank 0 hosts the rendezvous and is the hub of
//! a star; every reduction sends each peer's buffer to it, which sums them in rank order and
//! sends the sum back. Plain TCP, unencrypted: what crosses is the run token at the
//! rendezvous, then gradients, step totals and weight checksums as little-endian f32.
//!
//! A peer that dies closes its socket, so the hub learns of it at its next read and tells the
//! others (an abort frame naming the lost rank) before it fails itself; a hub that dies is
//! seen the same way by every other peer.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use thinkjson_model::burn::tensor::backend::Backend;
use thinkjson_model::burn::tensor::{Tensor, TensorData};
use thinkjson_model::train::Collective;
use thinkjson_model::ModelError;

const DATA: u8 = 0;
const ABORT: u8 = 1;
const HELLO: u8 = 2;
/// Larger frames are refused rather than allocated (a corrupt or hostile length).
const MAX_FRAME: u64 = 16 << 30;
const PROTOCOL: &str = "thinkjson-launch/1";

/// How a process joins its run.
#[derive(Debug, Clone)]
pub struct Rendezvous {
    pub nodes: usize,
    pub rank: usize,
    /// Where rank 0 listens (and only there) and the others connect.
    pub address: SocketAddr,
    pub token: String,
    /// Peer addresses rank 0 admits; empty: loopback only.
    pub allow: Vec<IpAddr>,
    /// How long to wait for every peer to join.
    pub join_timeout: Duration,
    /// Longest silence from a peer before it counts as lost (a dead process is seen at once).
    pub peer_timeout: Duration,
}

#[derive(Serialize, Deserialize)]
struct Hello {
    protocol: String,
    token: String,
    rank: usize,
    nodes: usize,
}

/// One process's end of the star.
pub struct TcpPeer {
    rank: usize,
    world: usize,
    /// Rank 0: the streams of ranks 1..world, in rank order. Others: the hub's stream alone.
    links: Vec<TcpStream>,
}

impl TcpPeer {
    /// Joins the run: rank 0 listens and admits the other ranks; the others connect to it.
    pub fn join(r: &Rendezvous) -> Result<Self> {
        if r.nodes < 2 || r.rank >= r.nodes {
            bail!("--node-rank {} is not a rank of {} nodes (need ≥ 2 nodes, ranks 0..{})", r.rank, r.nodes, r.nodes.saturating_sub(1));
        }
        let links = if r.rank == 0 { host(r)? } else { vec![connect(r)?] };
        for s in &links {
            s.set_read_timeout(Some(r.peer_timeout)).context("setting the peer timeout")?;
            s.set_nodelay(true).ok();
        }
        Ok(Self { rank: r.rank, world: r.nodes, links })
    }

    fn reduce(&mut self, mut values: Vec<f32>) -> Result<Vec<f32>, ModelError> {
        if self.rank == 0 {
            for i in 0..self.links.len() {
                let rank = i + 1;
                let theirs = match read_frame(&mut self.links[i]) {
                    Ok((DATA, bytes)) if bytes.len() == values.len() * 4 => bytes,
                    Ok((DATA, bytes)) => return Err(self.abort(format!("rank {rank} sent {} values for a reduction of {}", bytes.len() / 4, values.len()))),
                    Ok((_, bytes)) => return Err(self.abort(format!("rank {rank} stopped: {}", String::from_utf8_lossy(&bytes)))),
                    Err(e) => return Err(self.abort(format!("lost rank {rank}: {e}"))),
                };
                for (v, c) in values.iter_mut().zip(theirs.chunks_exact(4)) {
                    *v += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            let bytes = to_bytes(&values);
            for i in 0..self.links.len() {
                if let Err(e) = write_frame(&mut self.links[i], DATA, &bytes) {
                    return Err(self.abort(format!("lost rank {}: {e}", i + 1)));
                }
            }
            Ok(values)
        } else {
            let hub = &mut self.links[0];
            write_frame(hub, DATA, &to_bytes(&values)).map_err(|e| lost_hub(&e))?;
            match read_frame(hub) {
                Ok((DATA, bytes)) if bytes.len() == values.len() * 4 => {
                    values = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                    Ok(values)
                }
                Ok((DATA, _)) => Err(ModelError::Device("rank 0 sent a reduction of the wrong size".into())),
                Ok((_, bytes)) => Err(ModelError::Device(format!("the run stopped: {}", String::from_utf8_lossy(&bytes)))),
                Err(e) => Err(lost_hub(&e)),
            }
        }
    }

    /// Tells every other peer why the run stops, and returns that as this peer's error.
    fn abort(&mut self, why: String) -> ModelError {
        for s in &mut self.links {
            let _ = write_frame(s, ABORT, why.as_bytes());
        }
        ModelError::Device(why)
    }
}

impl<B: Backend> Collective<B> for TcpPeer {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&mut self, buffer: Tensor<B, 1>) -> Result<Tensor<B, 1>, ModelError> {
        let device = buffer.device();
        let values = buffer
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| ModelError::Input(format!("reading a buffer to reduce: {e:?}")))?;
        let n = values.len();
        let summed = self.reduce(values)?;
        Ok(Tensor::from_data(TensorData::new(summed, [n]), &device))
    }
}

fn lost_hub(e: &std::io::Error) -> ModelError {
    ModelError::Device(format!("lost rank 0 (the rendezvous host): {e}"))
}

fn to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn write_frame(s: &mut TcpStream, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = kind;
    head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(payload)?;
    s.flush()
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head)?;
    let mut len = [0u8; 8];
    len.copy_from_slice(&head[1..]);
    let len = u64::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a frame of {len} bytes")));
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload)?;
    Ok((head[0], payload))
}

/// Rank 0: listens on the rendezvous address only, admits each other rank once, refuses (and
/// reports) peers from addresses not allowed, with a wrong token or a wrong run shape.
fn host(r: &Rendezvous) -> Result<Vec<TcpStream>> {
    let listener = TcpListener::bind(r.address).with_context(|| format!("listening on {}", r.address))?;
    listener.set_nonblocking(true).context("listener")?;
    eprintln!("launch: rank 0 waiting for {} peer(s) on {}", r.nodes - 1, r.address);
    let deadline = Instant::now() + r.join_timeout;
    let mut joined: Vec<Option<TcpStream>> = (0..r.nodes - 1).map(|_| None).collect();
    while joined.iter().any(Option::is_none) {
        if Instant::now() > deadline {
            let missing: Vec<usize> = joined.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(i, _)| i + 1).collect();
            bail!("rank(s) {missing:?} did not join within {} s", r.join_timeout.as_secs());
        }
        let (mut stream, from) = match listener.accept() {
            Ok(pair) => pair,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => return Err(e).context("accepting a peer"),
        };
        stream.set_nonblocking(false).context("peer stream")?;
        let allowed = if r.allow.is_empty() { from.ip().is_loopback() } else { r.allow.contains(&from.ip()) };
        if !allowed {
            eprintln!("launch: refused a peer from {from}: address not allowed (--allow)");
            // Read its greeting first: closing a socket with unread data resets the
            // connection, and the peer then saw "broken pipe" instead of the reason.
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = read_frame(&mut stream);
            let _ = write_frame(&mut stream, ABORT, b"refused: address not allowed");
            continue;
        }
        stream.set_read_timeout(Some(Duration::from_secs(10))).context("peer stream")?;
        let hello = read_frame(&mut stream).ok().filter(|(k, _)| *k == HELLO).and_then(|(_, b)| serde_json::from_slice::<Hello>(&b).ok());
        let refusal = match &hello {
            None => Some("no greeting of this protocol".to_string()),
            Some(h) if h.protocol != PROTOCOL => Some(format!("protocol {} (expected {PROTOCOL})", h.protocol)),
            Some(h) if h.token != r.token => Some("wrong run token".to_string()),
            Some(h) if h.nodes != r.nodes => Some(format!("started for {} nodes, this run has {}", h.nodes, r.nodes)),
            Some(h) if h.rank == 0 || h.rank >= r.nodes => Some(format!("rank {} is not a peer rank of {} nodes", h.rank, r.nodes)),
            Some(h) if joined[h.rank - 1].is_some() => Some(format!("rank {} already joined", h.rank)),
            Some(_) => None,
        };
        if let Some(why) = refusal {
            eprintln!("launch: refused a peer from {from}: {why}");
            let _ = write_frame(&mut stream, ABORT, format!("refused: {why}").as_bytes());
            continue;
        }
        if let Some(h) = hello {
            write_frame(&mut stream, DATA, &[]).with_context(|| format!("admitting rank {} from {from}", h.rank))?;
            eprintln!("launch: rank {} joined from {from}", h.rank);
            joined[h.rank - 1] = Some(stream);
        }
    }
    Ok(joined.into_iter().flatten().collect())
}

/// Ranks ≥ 1: connect (retrying until rank 0 listens), greet, and wait to be admitted.
fn connect(r: &Rendezvous) -> Result<TcpStream> {
    let deadline = Instant::now() + r.join_timeout;
    let mut stream = loop {
        match TcpStream::connect_timeout(&r.address, Duration::from_secs(5)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e).with_context(|| format!("rank 0 did not answer at {} within {} s", r.address, r.join_timeout.as_secs())),
        }
    };
    let hello = Hello { protocol: PROTOCOL.into(), token: r.token.clone(), rank: r.rank, nodes: r.nodes };
    let greeted = write_frame(&mut stream, HELLO, &serde_json::to_vec(&hello)?);
    stream.set_read_timeout(Some(r.join_timeout)).context("rendezvous stream")?;
    let answer = read_frame(&mut stream);
    // A refused greeting may fail to send once rank 0 has closed; its reason, when it
    // arrived, says more than the failed write.
    if let Err(e) = greeted {
        if !matches!(answer, Ok((kind, _)) if kind != DATA) {
            return Err(e).context("greeting rank 0");
        }
    }
    match answer {
        Ok((DATA, _)) => Ok(stream),
        Ok((_, why)) => bail!("rank 0 at {} {}", r.address, String::from_utf8_lossy(&why)),
        Err(e) => Err(e).with_context(|| format!("waiting to be admitted by rank 0 at {}", r.address)),
    }
}
