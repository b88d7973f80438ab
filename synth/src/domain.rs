//! The document kinds of GMP / biomanufacturing quality work, as Rust types. Their JSON
//! Schemas come from `schemars` (descriptions, formats, enums, bounds, id patterns); the
//! variator in `schema_ops` derives many schemas from each.

use schemars::{JsonSchema, Schema};
use serde::{Deserialize, Serialize};

// Id patterns: each has a generator in `values::id_for_pattern`.
pub const LOT_PATTERN: &str = r"^LOT-[0-9]{4}-[0-9]{4}$";
pub const BATCH_PATTERN: &str = r"^B[0-9]{6}$";
pub const EQUIPMENT_PATTERN: &str = r"^EQ-[A-Z]{2}-[0-9]{3}$";
pub const DEVIATION_PATTERN: &str = r"^DEV-[0-9]{4}-[0-9]{3}$";
pub const CAPA_PATTERN: &str = r"^CAPA-[0-9]{5}$";
pub const CHANGE_PATTERN: &str = r"^CC-[0-9]{4}-[0-9]{2}$";
pub const SOP_PATTERN: &str = r"^SOP-[A-Z]{2,3}-[0-9]{3}$";
pub const PRODUCT_CODE_PATTERN: &str = r"^[A-Z]{3}-[0-9]{3}$";

/// Every document kind the generator knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocKind {
    BatchRecord,
    Deviation,
    Capa,
    Calibration,
    EnvironmentalMonitoring,
    CertificateOfAnalysis,
    ChangeControl,
    Training,
    CleaningValidation,
    StabilityStudy,
    SupplierAudit,
}

impl DocKind {
    pub const ALL: [DocKind; 11] = [
        DocKind::BatchRecord,
        DocKind::Deviation,
        DocKind::Capa,
        DocKind::Calibration,
        DocKind::EnvironmentalMonitoring,
        DocKind::CertificateOfAnalysis,
        DocKind::ChangeControl,
        DocKind::Training,
        DocKind::CleaningValidation,
        DocKind::StabilityStudy,
        DocKind::SupplierAudit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DocKind::BatchRecord => "batch_record",
            DocKind::Deviation => "deviation",
            DocKind::Capa => "capa",
            DocKind::Calibration => "calibration",
            DocKind::EnvironmentalMonitoring => "environmental_monitoring",
            DocKind::CertificateOfAnalysis => "certificate_of_analysis",
            DocKind::ChangeControl => "change_control",
            DocKind::Training => "training",
            DocKind::CleaningValidation => "cleaning_validation",
            DocKind::StabilityStudy => "stability_study",
            DocKind::SupplierAudit => "supplier_audit",
        }
    }

    /// How a person would title the document.
    pub fn title(self) -> &'static str {
        match self {
            DocKind::BatchRecord => "Batch production record",
            DocKind::Deviation => "Deviation report",
            DocKind::Capa => "CAPA record",
            DocKind::Calibration => "Equipment calibration log",
            DocKind::EnvironmentalMonitoring => "Environmental monitoring report",
            DocKind::CertificateOfAnalysis => "Certificate of analysis",
            DocKind::ChangeControl => "Change control request",
            DocKind::Training => "Training record",
            DocKind::CleaningValidation => "Cleaning validation report",
            DocKind::StabilityStudy => "Stability study summary",
            DocKind::SupplierAudit => "Supplier audit report",
        }
    }

    pub fn parse(s: &str) -> Option<DocKind> {
        DocKind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// The kind's schema as `schemars` derives it (before normalisation and variation).
    pub fn base_schema(self) -> Schema {
        match self {
            DocKind::BatchRecord => schemars::schema_for!(BatchRecord),
            DocKind::Deviation => schemars::schema_for!(Deviation),
            DocKind::Capa => schemars::schema_for!(Capa),
            DocKind::Calibration => schemars::schema_for!(Calibration),
            DocKind::EnvironmentalMonitoring => schemars::schema_for!(EnvironmentalMonitoring),
            DocKind::CertificateOfAnalysis => schemars::schema_for!(CertificateOfAnalysis),
            DocKind::ChangeControl => schemars::schema_for!(ChangeControl),
            DocKind::Training => schemars::schema_for!(Training),
            DocKind::CleaningValidation => schemars::schema_for!(CleaningValidation),
            DocKind::StabilityStudy => schemars::schema_for!(StabilityStudy),
            DocKind::SupplierAudit => schemars::schema_for!(SupplierAudit),
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
}

#[derive(JsonSchema, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Minor,
    Major,
    Critical,
}

/// A person who signed or performed a step.
#[derive(JsonSchema, Serialize, Deserialize)]
pub struct Signatory {
    /// Full name of the person.
    pub name: String,
    /// Job role of the person.
    pub role: String,
    /// Date of the signature.
    #[schemars(extend("format" = "date"))]
    pub signed_on: Option<String>,
}

/// One manufacturing step of a batch.
#[derive(JsonSchema, Serialize, Deserialize)]
pub struct ProcessStep {
    /// Step number in the master batch record.
    #[schemars(range(min = 1, max = 99))]
    pub step_number: u32,
    /// What was done.
    pub description: String,
    /// Equipment used.
    #[schemars(regex(pattern = r"^EQ-[A-Z]{2}-[0-9]{3}$"))]
    pub equipment_id: String,
    /// Process temperature in °C.
    #[schemars(range(min = -80, max = 250))]
    pub temperature_c: Option<f64>,
    /// Step duration in minutes.
    #[schemars(range(min = 1, max = 1440))]
    pub duration_min: u32,
    /// Operator who performed the step.
    pub performed_by: Signatory,
}

/// Batch production record (executed master batch record).
#[derive(JsonSchema, Serialize, Deserialize)]
pub struct BatchRecord {
    /// Lot number of the batch.
    #[schemars(regex(pattern = r"^LOT-[0-9]{4}-[0-9]{4}$"))]
    pub lot_number: String,
    /// Internal batch identifier.
    #[schemars(regex(pattern = r"^B[0-9]{6}$"))]
    pub batch_id: String,
    /// Product name.
    pub product_name: String,
    /// Manufacturing site.
    pub site: String,
    /// Start of manufacture.
    #[schemars(extend("format" = "date-time"))]
    pub manufacture_start: String,
    /// Batch size in litres.
    #[schemars(range(min = 1, max = 20000))]
    pub batch_size_l: f64,
    /// Yield in percent of theoretical.
    #[schemars(range(min = 0, max = 110))]
    pub yield_percent: Option<f64>,
    /// Executed process steps.
    #[schemars(length(min = 1, max = 4))]
    pub steps: Vec<ProcessStep>,
    /// QA release decision.
    pub qa_release: Outcome,
    /// Remarks by production.
    #[schemars(length(max = 300))]
    pub remarks: Option<String>,
}

/// Deviation report.
#[derive(JsonSchema, Serialize, Deserialize)]
pub struct Deviation {
    /// Deviation number.
    #[schemars(regex(pattern = r"^DEV-[0-9]{4}-[0-9]{3}$"))]
    pub deviation_id: String,
    /// When the event was detected.
    #[schemars(extend("format" = "date-time"))]
    pub detected_at: String,
    /// Affected lot.
    #[schemars(regex(pattern = r"^LOT-[0-9]{4}-[0-9]{4}$"))]
    pub lot_number: String,
    /// Classification of the deviation.
    pub severity: Severity,
    /// Department where it occurred.
    pub department: String,
    /// What happened.
    pub description: String,
    /// Whether product quality is impacted.
    pub product_impact: bool,
    /// Root cause, once known.
    pub root_cause: Option<String>,
    /// Person who reported it.
    pub reported_by: Signatory,
    /// Contact e-mail of the deviation owner.
    #[schemars(email)]
    pub owner_email: String,
}

/// One corrective or preventive action.
#[derive(JsonSchema, Serialize, Deserialize)]
pub struct Action {
    /// What will be done.
    pub action: String,
    /// Responsible person.
    pub owner: String,
    /// Due date.
    #[schemars(extend("format" = "date"))]
    pub due_date: String,
    /// Action type.
    pub action_type: ActionType,
}

#[derive(JsonSchema, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionType {
    Corrective,
    Preventive,
}

/// Corrective and preventive action record.
#[derive(JsonSchema, Serialize, Deserialize)]
pub struct Capa {
    /// CAPA number.
    #[schemars(regex(pattern = r"^CAPA-[0-9]{5}$"))]
    pub capa_id: String,
    /// Deviation that triggered the CAPA.
    #[schemars(regex(pattern = r"^DEV-[0-9]{4}-[0-9]{3}$"))]
    pub source_deviation: Option<String>,
    /// Date the CAPA was opened.
    #[schemars(extend("format" = "date"))]
    pub opened_on: String,
    /// Planned actions.
    #[schemars(length(min = 1, max = 3))]
    pub actions: Vec<Action>,
    /// Effectiveness check passed.
    pub effective: Option<bool>,
    /// Current status.
    pub status: CapaStatus,
}

#[derive(JsonSchema, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapaStatus {
    Open,
    InProgress,
    Closed,
}

/// One calibration point.
#[derive(JsonSchema, Serialize, Deserialize)]
pub struct CalibrationPoint {
    /// Reference value applied.
    #[schemars(range(min = -100, max = 1000))]
    pub reference_value: f64,
    /// Value the instrument read.
    #[schemars(range(min = -100, max = 1000))]
    pub measured_value: f64,
    /// Whether the point is within tolerance.
    pub within_tolerance: bool,
}

/// Equipment calibration log entry.
#[derive(JsonSchema, Serialize, Deserialize)]
pub struct Calibration {
    /// Equipment identifier.
    #[schemars(regex(pattern = r"^EQ-[A-Z]{2}-[0-9]{3}$"))]
    pub equipment_id: String,
    /// Instrument name.
    pub instrument: String,
    /// Calibration date.
    #[schemars(extend("format" = "date"))]
    pub calibrated_on: String,
    /// Next calibration due.
    #[schemars(extend("format" = "date"))]
    pub next_due: String,
    /// Calibration points.
    #[schemars(length(min = 1, max = 4))]
    pub points: Vec<CalibrationPoint>,
    /// Overall result.
    pub result: Outcome,
    /// Technician.
    pub technician: Signatory,
}

/// One monitoring sample.
#[derive(JsonSchema, Serialize, Deserialize)]
pub struct MonitoringSample {
    /// Sampling location.
    pub location: String,
    /// Cleanroom grade.
    pub grade: CleanroomGrade,
    /// Colony forming units per plate.
    #[schemars(range(min = 0, max = 500))]
    pub cfu: u32,
    /// Relative humidity in percent.
    #[schemars(range(min = 0, max = 100))]
    pub relative_humidity_percent: Option<f64>,
}

#[derive(JsonSchema, Serialize, Deserialize)]
pub enum CleanroomGrade {
    A,
    B,
    C,
    D,
}

/// Environmental monitoring report.
#[derive(JsonSchema, Serialize, Deserialize)]
pub struct EnvironmentalMonitoring {
    /// Monitoring session identifier.
    #[schemars(extend("format" = "uuid"))]
    pub session_id: String,
    /// Room or area.
    pub area: String,
    /// Sampling time.
    #[schemars(extend("format" = "date-time"))]
    pub sampled_at: String,
    /// Samples taken.
    #[schemars(length(min = 1, max = 4))]
    pub samples: Vec<MonitoringSample>,
    /// Alert or action limit exceeded.
    pub excursion: bool,
    /// Microbiologist who read the plates.
    pub analyst: Signatory,
}

/// One test of a certificate of analysis.
#[derive(JsonSchema, Serialize, Deserialize)]
pub struct TestResult {
    /// Test name.
    pub test: String,
    /// Reported result value.
    #[schemars(range(min = 0, max = 10000))]
    pub value: f64,
    /// Unit of the result.
    pub unit: String,
    /// Conformance.
    pub outcome: Outcome,
}

/// Certificate of analysis.
#[derive(JsonSchema, Serialize, Deserialize)]
pub struct CertificateOfAnalysis {
    /// Product code.
    #[schemars(regex(pattern = r"^[A-Z]{3}-[0-9]{3}$"))]
    pub product_code: String,
    /// Lot number.
    #[schemars(regex(pattern = r"^LOT-[0-9]{4}-[0-9]{4}$"))]
    pub lot_number: String,
    /// pH of the solution.
    #[schemars(range(min = 0, max = 14))]
    pub ph: f64,
    /// Assay in percent of label claim.
    #[schemars(range(min = 0, max = 120))]
    pub assay_percent: f64,
    /// Tests performed.
    #[schemars(length(min = 1, max = 4))]
    pub tests: Vec<TestResult>,
    /// Release date.
    #[schemars(extend("format" = "date"))]
    pub release_date: String,
    /// Approving QA person.
    pub approved_by: Signatory,
}

/// Change control request.
#[derive(JsonSchema, Serialize, Deserialize)]
pub struct ChangeControl {
    /// Change control number.
    #[schemars(regex(pattern = r"^CC-[0-9]{4}-[0-9]{2}$"))]
    pub change_id: String,
    /// Title of the change.
    pub title: String,
    /// Change category.
    pub category: ChangeCategory,
    /// Affected SOPs.
    #[schemars(length(max = 3))]
    pub affected_sops: Vec<SopRef>,
    /// Regulatory filing required.
    pub regulatory_impact: bool,
    /// Requested implementation date.
    #[schemars(extend("format" = "date"))]
    pub target_date: Option<String>,
    /// Requester.
    pub requested_by: Signatory,
}

/// Reference to a standard operating procedure.
#[derive(JsonSchema, Serialize, Deserialize)]
pub struct SopRef {
    /// SOP number.
    #[schemars(regex(pattern = r"^SOP-[A-Z]{2,3}-[0-9]{3}$"))]
    pub sop_id: String,
    /// SOP revision.
    #[schemars(range(min = 1, max = 30))]
    pub revision: u32,
}

#[derive(JsonSchema, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeCategory {
    Equipment,
    Process,
    Document,
    Facility,
}

/// Training record.
#[derive(JsonSchema, Serialize, Deserialize)]
pub struct Training {
    /// Trainee.
    pub trainee: String,
    /// Trainee e-mail.
    #[schemars(email)]
    pub trainee_email: String,
    /// SOP trained on.
    #[schemars(regex(pattern = r"^SOP-[A-Z]{2,3}-[0-9]{3}$"))]
    pub sop_id: String,
    /// Training date.
    #[schemars(extend("format" = "date"))]
    pub completed_on: String,
    /// Assessment score in percent.
    #[schemars(range(min = 0, max = 100))]
    pub score_percent: Option<u32>,
    /// Whether the trainee is qualified.
    pub qualified: bool,
    /// Trainer.
    pub trainer: Signatory,
}

/// One swab sample of a cleaning validation.
#[derive(JsonSchema, Serialize, Deserialize)]
pub struct SwabSample {
    /// Swab location on the equipment.
    pub location: String,
    /// Residue found in µg per swab.
    #[schemars(range(min = 0, max = 1000))]
    pub residue_ug: f64,
    /// Conformance to the acceptance limit.
    pub outcome: Outcome,
}

/// Cleaning validation report.
#[derive(JsonSchema, Serialize, Deserialize)]
pub struct CleaningValidation {
    /// Cleaned equipment.
    #[schemars(regex(pattern = r"^EQ-[A-Z]{2}-[0-9]{3}$"))]
    pub equipment_id: String,
    /// Previous product made on the equipment.
    pub previous_product: String,
    /// Cleaning procedure.
    #[schemars(regex(pattern = r"^SOP-[A-Z]{2,3}-[0-9]{3}$"))]
    pub procedure: String,
    /// Acceptance limit in µg per swab.
    #[schemars(range(min = 0, max = 1000))]
    pub acceptance_limit_ug: f64,
    /// Swab results.
    #[schemars(length(min = 1, max = 4))]
    pub swabs: Vec<SwabSample>,
    /// Validation run number.
    #[schemars(range(min = 1, max = 3))]
    pub run_number: u32,
    /// Reviewer.
    pub reviewed_by: Signatory,
}

/// One stability time point.
#[derive(JsonSchema, Serialize, Deserialize)]
pub struct StabilityPoint {
    /// Months on stability.
    #[schemars(range(min = 0, max = 60))]
    pub month: u32,
    /// Assay in percent of label claim.
    #[schemars(range(min = 0, max = 120))]
    pub assay_percent: f64,
    /// Total impurities in percent.
    #[schemars(range(min = 0, max = 10))]
    pub impurities_percent: Option<f64>,
}

/// Stability study summary.
#[derive(JsonSchema, Serialize, Deserialize)]
pub struct StabilityStudy {
    /// Study identifier.
    #[schemars(extend("format" = "uuid"))]
    pub study_id: String,
    /// Lot on stability.
    #[schemars(regex(pattern = r"^LOT-[0-9]{4}-[0-9]{4}$"))]
    pub lot_number: String,
    /// Storage condition.
    pub condition: StorageCondition,
    /// Storage temperature in °C.
    #[schemars(range(min = -80, max = 60))]
    pub storage_temperature_c: f64,
    /// Time points tested.
    #[schemars(length(min = 1, max = 4))]
    pub time_points: Vec<StabilityPoint>,
    /// Shelf life supported in months.
    #[schemars(range(min = 1, max = 60))]
    pub shelf_life_months: Option<u32>,
}

#[derive(JsonSchema, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageCondition {
    LongTerm,
    Intermediate,
    Accelerated,
}

/// One audit finding.
#[derive(JsonSchema, Serialize, Deserialize)]
pub struct Finding {
    /// Finding text.
    pub observation: String,
    /// Classification.
    pub severity: Severity,
    /// Response due date.
    #[schemars(extend("format" = "date"))]
    pub response_due: Option<String>,
}

/// Supplier audit report.
#[derive(JsonSchema, Serialize, Deserialize)]
pub struct SupplierAudit {
    /// Supplier name.
    pub supplier: String,
    /// Material supplied.
    pub material: String,
    /// Audit date.
    #[schemars(extend("format" = "date"))]
    pub audit_date: String,
    /// Lead auditor e-mail.
    #[schemars(email)]
    pub auditor_email: String,
    /// Findings.
    #[schemars(length(max = 3))]
    pub findings: Vec<Finding>,
    /// Supplier approved.
    pub approved: bool,
    /// Audit score out of 100.
    #[schemars(range(min = 0, max = 100))]
    pub score: Option<u32>,
}
